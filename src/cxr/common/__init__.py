"""Building blocks every layer uses: files, progress, signals, devices, folder locks."""
