"""What every stage shares: errors and exit codes, settings, prompt files, take names, the Waveform type, and the platform helpers (signals, child processes, test hooks)."""
