"""Running plans: :func:`clustersim.run.evaluate.evaluate` (the one verdict of every verb),
the training and serving simulations, recording traces, replaying them."""
