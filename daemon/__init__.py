"""rloopd: an event-sourced daemon that runs autonomous ML research loops."""

__version__ = "0.1.0"
