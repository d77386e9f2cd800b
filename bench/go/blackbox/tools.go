//go:build tools

// Package tools pins Prometheus blackbox_exporter, built for mailroom's probe benchmark
// as a baseline (see scripts/bench). Nothing of it is linked into mailroom.
package tools

import _ "github.com/prometheus/blackbox_exporter"
