"""The edgelm daemon: `edgelm serve`."""
