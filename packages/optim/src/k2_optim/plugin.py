"""Plugin hooks of k2_optim: nothing is registered until its features are implemented."""
