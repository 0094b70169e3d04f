"""What ops people look at: one shipment's story, the system at a glance, stalls, retention."""
