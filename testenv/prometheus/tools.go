//go:build tools

// Pins the prometheus and promtool commands' packages in go.mod, so `go build` finds them.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
