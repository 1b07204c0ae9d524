{{/* Names and labels. */}}
{{- define "llm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The server pods alone (the in-chart Redis shares name and instance). */}}
{{- define "llm.serverSelectorLabels" -}}
{{ include "llm.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "llm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding API_KEYS: the operator's, or the one the chart makes. */}}
{{- define "llm.keysSecret" -}}
{{- if .Values.keys.existingSecret }}{{ .Values.keys.existingSecret }}{{ else }}{{ include "llm.fullname" . }}-keys{{ end }}
{{- end }}

{{/* The data volume's claim: the operator's (models/ inside), or the chart's. */}}
{{- define "llm.dataClaim" -}}
{{- if .Values.model.existingClaim }}{{ .Values.model.existingClaim }}{{ else if .Values.persistence.enabled }}{{ include "llm.fullname" . }}-data{{ end }}
{{- end }}

{{- define "llm.redisUrl" -}}
{{- if .Values.redis.url }}{{ .Values.redis.url }}{{ else if .Values.redis.enabled }}{{ printf "redis://%s-redis:6379/0" (include "llm.fullname" .) }}{{ end }}
{{- end }}

{{/* Seconds between SIGTERM's preStop and SIGKILL: the drain, and the backends' stop. */}}
{{- define "llm.gracePeriod" -}}
{{- $derived := add (int .Values.preStopSleep) (int .Values.drainTimeout) 15 }}
{{- if .Values.terminationGracePeriodSeconds }}{{ int .Values.terminationGracePeriodSeconds }}{{ else }}{{ $derived }}{{ end }}
{{- end }}

{{- define "llm.autoscaled" -}}
{{- if ne .Values.autoscaling.kind "none" }}true{{ end }}
{{- end }}

{{/* The label matchers of this release's series in Prometheus. */}}
{{- define "llm.metricSelector" -}}
{{- if .Values.autoscaling.keda.selector }}{{ .Values.autoscaling.keda.selector }}{{ else }}{{ printf "namespace=%q,service=%q" .Release.Namespace (include "llm.fullname" .) }}{{ end }}
{{- end }}

{{/*
Rules values.schema.json cannot say: each failure names the value and the fix. Included by
every template that depends on them, so no partial render gets past them.
*/}}
{{- define "llm.validate" -}}
{{- $v := .Values }}
{{- if not (or $v.model.repo $v.model.existingClaim) }}
{{- fail "model.repo or model.existingClaim is required: set model.repo=owner/repo[:QUANT] (fetched from the Hugging Face Hub into the data volume) or model.existingClaim=<a PVC holding models/>" }}
{{- end }}
{{- if and $v.model.repo $v.model.name }}
{{- fail "model.name names a file under models/ and model.repo a Hub repo: set one of them" }}
{{- end }}
{{- if $v.auth.enabled }}
{{- if not (or $v.keys.existingSecret $v.keys.apiKeys) }}
{{- fail "keys.existingSecret is required: a Secret whose API_KEYS entry holds key lines (kubectl create secret generic llm-keys --from-literal=API_KEYS='alice:sha256:<hex>'), or keys.apiKeys, or auth.enabled=false to serve without keys" }}
{{- end }}
{{- if and $v.keys.existingSecret $v.keys.apiKeys }}
{{- fail "keys.existingSecret and keys.apiKeys are both set: keep one source of keys" }}
{{- end }}
{{- end }}
{{- if and $v.redis.url $v.redis.enabled }}
{{- fail "redis.url and redis.enabled are both set: use the existing Redis (redis.url) or the chart's (redis.enabled), not both" }}
{{- end }}
{{- $several := or (gt (int $v.replicaCount) 1) (ne $v.autoscaling.kind "none") }}
{{- if and $several (not (or $v.redis.url $v.redis.enabled)) }}
{{- fail "redis.url or redis.enabled is required with replicaCount > 1 or autoscaling.kind hpa/keda: without Redis each pod would hold its own copy of every key's limits" }}
{{- end }}
{{- if and $several (not $v.model.existingClaim) $v.persistence.enabled (not (has "ReadWriteMany" $v.persistence.accessModes)) }}
{{- fail "persistence.accessModes must include ReadWriteMany with replicaCount > 1 or autoscaling: every pod mounts the one data volume (or use model.existingClaim with a ReadWriteMany claim, or persistence.enabled=false to download per pod)" }}
{{- end }}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" }}
{{- end }}
{{- if and (eq $v.autoscaling.kind "hpa") (lt (int $v.autoscaling.minReplicas) 1) }}
{{- fail "autoscaling.minReplicas 0 needs autoscaling.kind=keda: an HPA cannot scale to zero" }}
{{- end }}
{{- if eq $v.autoscaling.kind "keda" }}
{{- if not $v.autoscaling.keda.serverAddress }}
{{- fail "autoscaling.keda.serverAddress is required with autoscaling.kind=keda: the Prometheus that scrapes the gateway, e.g. http://prometheus-operated.monitoring:9090" }}
{{- end }}
{{- if and (eq (int $v.autoscaling.minReplicas) 0) (not $v.autoscaling.keda.activationTriggers) }}
{{- fail "autoscaling.minReplicas 0 needs autoscaling.keda.activationTriggers: at zero pods the gateway's own metrics do not exist, so only another signal (e.g. the ingress controller's request rate) can wake the release" }}
{{- end }}
{{- end }}
{{- if and $v.terminationGracePeriodSeconds (le (int $v.terminationGracePeriodSeconds) (add (int $v.preStopSleep) (int $v.drainTimeout))) }}
{{- fail "terminationGracePeriodSeconds must exceed preStopSleep + drainTimeout, or in-flight requests are killed before the drain ends (leave it empty to derive it)" }}
{{- end }}
{{- range $name, $_ := $v.server.env }}
{{- if has $name (list "DATA_DIR" "HOME" "PORT" "PORT_HEALTH" "DRAIN_TIMEOUT" "MODEL_REPO" "MODEL_REPO_FILE" "MODEL_REVISION" "MODEL_NAME" "MODEL_ALIAS" "HF_ENDPOINT" "HF_TOKEN" "API_KEYS" "AUTH_KEYS_FILE" "AUTH_ENABLED" "REDIS_URL" "METRICS_AUTH_ENABLED" "NGL" "CTX" "PARALLEL" "EXTRA_ARGS" "BACKENDS" "LOG_FORMAT" "LOG_LEVEL" "MAX_REQUESTS_PER_MINUTE" "MAX_CONCURRENT_REQUESTS" "MAX_QUEUE_SIZE" "QUEUE_TIMEOUT") }}
{{- fail (printf "server.env.%s: the chart sets %s from its own values (see values.yaml); set it there" $name $name) }}
{{- end }}
{{- end }}
{{- if and $v.metrics.perKey.enabled (not $v.metrics.perKey.scrapeKeySecret.name) }}
{{- fail "metrics.perKey.scrapeKeySecret.name is required with metrics.perKey.enabled: /metrics then needs an admin-scope key to scrape" }}
{{- end }}
{{- end }}
