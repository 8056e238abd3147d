"""The EPP in a Kubernetes cluster: watchers for the InferencePool, its Pods, InferenceObjectives and
InferenceModels; leader election on a Lease. See README.md here for the modes, the readiness rule and which
plugin sets are safe with several active replicas."""
