"""What updates the weights: the engine that runs backward and the optimizer step under DDP or DeepSpeed ZeRO-2/3
(``engine``), AdamW and its learning-rate schedule (``adamw``), the sharded EMA (``ema``), and building and loading a
model already partitioned for ZeRO-3 (``zero3``)."""
