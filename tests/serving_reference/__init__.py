"""The serving engine as it was before its per-step bookkeeping was made faster: a frozen
copy of ``clustersim/engine/serving/{sim,scheduler,step_timer}.py`` (with the imports between
them pointed here), kept so that tests can check that the faster engine gives identical
results (``tests/test_serving_speed.py``). Not to be changed with the engine."""
