"""The training loop: its settings (``config``), one optimizer step (``step``), the loop itself (``trainer``), where a
run resumes (``resume``), what it logs (``metrics``), Pyramid Flow's loss (``pyramid_loss``) and validation samples
(``validation``)."""
