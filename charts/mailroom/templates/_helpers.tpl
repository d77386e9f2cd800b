{{/* The release's base name: the release name when it already says mailroom. */}}
{{- define "mailroom.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* The metrics Service, and the Prometheus job named after it: a Service name is a
DNS label (63 characters at most), so the fullname is cut to leave room for the suffix. */}}
{{- define "mailroom.metricsName" -}}
{{- printf "%s-metrics" (include "mailroom.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{- /* The Lease: the release's own unless named, so that two releases in one namespace
never elect one leader between them. */}}
{{- define "mailroom.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (include "mailroom.fullname" .) -}}
{{- end -}}

{{- define "mailroom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mailroom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailroom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* A shard's Deployment: the fullname alone, or <fullname>-shard-<i> when sharded. */}}
{{- define "mailroom.shardName" -}}
{{- $ctx := index . 0 -}}
{{- if gt (int $ctx.Values.sharding.shards) 1 -}}
{{- printf "%s-shard-%d" (include "mailroom.fullname" $ctx) (index . 1) -}}
{{- else -}}
{{- include "mailroom.fullname" $ctx -}}
{{- end -}}
{{- end -}}

{{/* A shard's pods: each Deployment selects its own. */}}
{{- define "mailroom.shardSelectorLabels" -}}
{{- $ctx := index . 0 -}}
{{ include "mailroom.selectorLabels" $ctx }}
{{- if gt (int $ctx.Values.sharding.shards) 1 }}
mailroom.dev/shard: {{ index . 1 | quote }}
{{- end -}}
{{- end -}}

{{- define "mailroom.labels" -}}
{{ include "mailroom.labelsWith" (list . dict) }}
{{- end -}}

{{- /* The chart's labels, then commonLabels with the object's own labels (podLabels,
a ServiceMonitor's) over them, each key once: a key in two of them rendered twice is YAML
that kustomize (Flux's post-renderer, Argo CD's helmCharts) refuses. The chart's own keys
are not overridden: a duplicate key in a pod template makes its labels miss the
Deployment's selector, and the Deployment is refused. */}}
{{- define "mailroom.labelsWith" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $ctx.Chart.Name $ctx.Chart.Version | replace "+" "_" }}
{{ include "mailroom.selectorLabels" $ctx }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: mailroom
{{- $user := deepCopy ($ctx.Values.commonLabels | default dict) }}
{{- /* set, not mergeOverwrite: that one skips an empty value, which would then not
override commonLabels' */}}
{{- range $key, $value := (index . 1 | default dict) }}
{{- $_ := set $user $key $value }}
{{- end }}
{{- with omit $user "helm.sh/chart" "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/part-of" "mailroom.dev/shard" "mailroom.dev/metrics" }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "mailroom.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mailroom.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mailroom.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The controller's rules on providers, Events, Secrets and ConfigMaps: one list for the
ClusterRole (every namespace) and the Roles (watchNamespaces).
*/}}
{{- define "mailroom.controllerRules" -}}
- apiGroups: [mailroom.dev]
  resources: [incomingmailproviders]
  verbs: [get, list, watch]
- apiGroups: [mailroom.dev]
  resources: [incomingmailproviders/status]
  verbs: [patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
{{- if .Values.oauth2.tokenRotation }}
# oauth2.tokenRotation: the OAuth2 token manager writes rotated refresh tokens (and the
# cached access token) back into the provider's tokenSecretRef Secret, with
# resourceVersion for optimistic concurrency (update). Never create: `mailroom authorize`
# creates token Secrets as the user, and whoever may create Secrets may have the token
# controller fill one with any ServiceAccount's token.
- apiGroups: [""]
  resources: [secrets]
  verbs: [update]
{{- end }}
{{- end -}}
