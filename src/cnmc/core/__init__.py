"""Foundation every layer uses: the typed settings, errors, atomic writes, the process group, import closures."""
