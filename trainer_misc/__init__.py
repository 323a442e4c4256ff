"""The training machinery around the model package, in layers that import only downwards (``tests/test_layers.py``)::

    planning/  what a launch costs, counted on meta tensors (FLOPs, memory per GPU); DRY_RUN and tools/plan.py
    loop/      the training loop: settings, one optimizer step, resume, logging, the Pyramid Flow loss, validation
    state/     what survives a process: checkpoints (and their verification), exports, RNG streams, the run lock
    optim/     what updates the weights: the DDP / DeepSpeed ZeRO engine, AdamW and its schedule, the EMA, ZeRO-3 init
    data/      annotation files, extracted latents and text features, datasets, the data check, the sampler
    runtime/   processes: process groups and rank layouts, launching and supervising them, how a process ends
    files.py   writing files atomically (safetensors, JSON)

Nothing here knows the model's internals: the loop calls a ``compute_loss`` (``loop/pyramid_loss.py`` is Pyramid
Flow's), and the model package (``pyramid_dit``, ``video_vae``) never imports from here.
"""
