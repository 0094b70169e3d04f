"""Tracking shipments: intake, claiming due shipments, polling them, recording what changed."""
