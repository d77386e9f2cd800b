# Versions and cache paths of the test bed, sourced by prepare and by the bed itself.
K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.19.5
# Prometheus 3.x's Go module version (v0.3xx.y is Prometheus v3.xx.y): promtool, for the
# chart's alert rules.
PROMETHEUS_VERSION=v0.316.0
CACHE_ROOT=${MAILROOM_TESTBED_CACHE:-$HOME/.cache/mailroom-testbed}
ETCD_BIN=$CACHE_ROOT/etcd-$ETCD_VERSION/etcd
KUBE_APISERVER_BIN=$CACHE_ROOT/k8s-$K8S_VERSION/kube-apiserver
KUBECTL_BIN=$CACHE_ROOT/k8s-$K8S_VERSION/kubectl
HELM_BIN=$CACHE_ROOT/helm-$HELM_VERSION/helm
PROMTOOL_BIN=$CACHE_ROOT/prometheus-$PROMETHEUS_VERSION/promtool
