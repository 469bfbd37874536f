"""The run: session (one booted guest), runner (checked ops), workload, trace, shrink."""
