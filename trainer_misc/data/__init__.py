"""The data side of training: annotation files (``annotation``), the extracted latents and text features
(``features``), training sizes (``resolution``), datasets and batches (``datasets``), the up-front data check
(``check``) and the resumable batch order (``sampler``)."""
