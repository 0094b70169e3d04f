"""The simulated carrier: workloads, the sandbox API and the demo; never in production paths."""
