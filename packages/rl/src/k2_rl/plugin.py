"""Plugin hooks of k2_rl: nothing is registered until its features are implemented."""
