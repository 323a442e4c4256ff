"""The training entry point (``train_pyramid_flow``), its flags and their checks (``args``), and the launcher the
training scripts run (``launch``)."""
