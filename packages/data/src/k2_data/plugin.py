"""Plugin hooks of k2_data: nothing is registered until its features are implemented."""
