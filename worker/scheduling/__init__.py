"""When each shipment is next worth a lookup: the learned model, its prices and the plan."""
