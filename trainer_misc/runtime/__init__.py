"""Processes: the process groups and rank layouts (``distributed``), launching and supervising the workers of a
script (``launcher``), and how a process ends when something goes wrong (``failures``)."""
