"""Foundation every layer uses: the typed settings and the metric names they may use, errors, atomic
writes, the process group, import closures."""
