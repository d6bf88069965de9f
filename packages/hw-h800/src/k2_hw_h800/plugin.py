"""Plugin hooks of k2_hw_h800: nothing is registered until its features are implemented."""
