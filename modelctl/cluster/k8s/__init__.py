"""Beyond one machine: a profile compiled to Kubernetes objects, and kubectl to apply them.

Kubernetes then does what the supervisor does locally (restarts, GPU allocation, placement,
probes); modelctl runs nothing inside the cluster. keys.py checks the profile's `k8s:` keys,
manifests.py writes the objects, kubectl.py applies, deletes and reads their state.
"""
