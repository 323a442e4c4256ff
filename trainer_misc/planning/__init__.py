"""What a launch will cost before it runs: the DiT traced on meta tensors (``planner``, with the instruments in
``tracing``) and the plan as text for ``DRY_RUN=1`` and ``tools/plan.py`` (``plan``)."""
