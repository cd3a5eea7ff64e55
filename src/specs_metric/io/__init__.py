"""Layer 1, files: every byte that enters (bounded reads) and every file a command writes
(safe writes), strict JSON, and the lock that keeps two jobs off one output."""
