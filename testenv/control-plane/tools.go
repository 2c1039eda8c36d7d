//go:build tools

// Pins the kube-apiserver command's packages in go.mod, so `go build` finds them.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
