"""Small shared pieces: artifacts, tracking, seeding, devices, distributed helpers."""
