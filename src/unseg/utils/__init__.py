"""Small shared helpers: atomic file writes, device and seeding, progress bars."""
