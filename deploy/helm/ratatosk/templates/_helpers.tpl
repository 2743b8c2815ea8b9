{{/* Names and labels. */}}
{{- define "ratatosk.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ratatosk.fullname" -}}
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

{{- define "ratatosk.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ratatosk.labels" -}}
{{ include "ratatosk.commonLabels" . }}
{{ include "ratatosk.selectorLabels" . }}
{{- end }}

{{- define "ratatosk.redisLabels" -}}
{{ include "ratatosk.commonLabels" . }}
{{ include "ratatosk.redisSelectorLabels" . }}
{{- end }}

{{- define "ratatosk.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ratatosk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "ratatosk.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "ratatosk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "ratatosk.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ratatosk.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ratatosk.secretName" -}}
{{- default (include "ratatosk.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* "true" when sessions live in Redis: the chart's own, or an external one. */}}
{{- define "ratatosk.redisOn" -}}
{{- $r := .Values.redis }}
{{- if or $r.enabled $r.external.url $r.external.existingSecret }}true{{ end }}
{{- end }}

{{/* "true" when the config's sessions live in Redis: the chart's, or a
`sessions.store: redis` the config sets itself (its URL from your env). */}}
{{- define "ratatosk.sharedStore" -}}
{{- $cfg := fromYaml (include "ratatosk.config" .) }}
{{- if eq (toString (dig "sessions" "store" "memory" $cfg)) "redis" }}true{{ end }}
{{- end }}

{{- define "ratatosk.redisUrl" -}}
{{- printf "redis://%s-redis:%d" (include "ratatosk.fullname" .) (int .Values.redis.port) }}
{{- end }}

{{/*
The config as the gateway reads it: values' `config` parsed, with the
fields the chart owns set. Returned as YAML text; callers that need fields
use `fromYaml` on it.
*/}}
{{- define "ratatosk.config" -}}
{{- $cfg := fromYaml .Values.config }}
{{- if hasKey $cfg "Error" }}
{{- fail (printf "config: not valid YAML: %s" (get $cfg "Error")) }}
{{- end }}
{{- $server := default (dict) (get $cfg "server") }}
{{- if hasKey $server "shutdown_grace" }}
{{- fail "config: don't set server.shutdown_grace; set drain.shutdownGraceSeconds, which the pod's termination grace period is computed from" }}
{{- end }}
{{- $_ := set $server "shutdown_grace" (printf "%ds" (int .Values.drain.shutdownGraceSeconds)) }}
{{- $_ := set $cfg "server" $server }}
{{- if include "ratatosk.redisOn" . }}
{{- $sessions := default (dict) (get $cfg "sessions") }}
{{- $_ := set $sessions "store" "redis" }}
{{- $_ := set $sessions "url" "${REDIS_URL}" }}
{{- $_ := set $cfg "sessions" $sessions }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The port of a literal host:port address; `what` names the field. */}}
{{- define "ratatosk.port" -}}
{{- $addr := toString (index . 1) }}
{{- if or (contains "${" $addr) (not (regexMatch ":[0-9]+$" $addr)) }}
{{- fail (printf "config: `%s` must be a literal host:port (the chart reads the port from it), not %q" (index . 0) $addr) }}
{{- end }}
{{- regexFind "[0-9]+$" $addr }}
{{- end }}

{{- define "ratatosk.mcpPort" -}}
{{- $cfg := fromYaml (include "ratatosk.config" .) }}
{{- include "ratatosk.port" (list "listen" (get $cfg "listen")) }}
{{- end }}

{{- define "ratatosk.adminPort" -}}
{{- $cfg := fromYaml (include "ratatosk.config" .) }}
{{- include "ratatosk.port" (list "admin_listen" (get $cfg "admin_listen")) }}
{{- end }}

{{/* HTTP or HTTPS: the admin listener's scheme, for probes and scrapes. */}}
{{- define "ratatosk.adminScheme" -}}
{{- $cfg := fromYaml (include "ratatosk.config" .) }}
{{- if get $cfg "admin_tls" }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* Seconds from SIGTERM until the process has surely exited: the grace,
then about one second for the runtimes to stop. */}}
{{- define "ratatosk.terminationGrace" -}}
{{- $d := .Values.drain }}
{{- $needed := add (int $d.preStopSleepSeconds) (int $d.shutdownGraceSeconds) 1 }}
{{- if kindIs "invalid" $d.terminationGracePeriodSeconds }}
{{- add $needed 4 }}
{{- else if le (int $d.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "drain.terminationGracePeriodSeconds (%d) must be above preStopSleepSeconds + shutdownGraceSeconds + 1 (%d), or Kubernetes kills pods mid-drain" (int $d.terminationGracePeriodSeconds) $needed) }}
{{- else }}
{{- int $d.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The environment names the chart gives the container. */}}
{{- define "ratatosk.envNames" -}}
{{- $names := list }}
{{- if not .Values.secrets.existingSecret }}
{{- $names = concat $names (keys .Values.secrets.env) }}
{{- end }}
{{- range .Values.extraEnv }}
{{- $names = append $names .name }}
{{- end }}
{{- if include "ratatosk.redisOn" . }}
{{- $names = append $names "REDIS_URL" }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
Refusals: settings that would deploy a gateway that cannot work. Rendered
by the Deployment, so `helm template` and `helm install` both stop here.
*/}}
{{- define "ratatosk.validate" -}}
{{- $redis := include "ratatosk.sharedStore" . }}
{{- if and (not $redis) (gt (int .Values.replicaCount) 1) (not .Values.autoscaling.enabled) }}
{{- fail (printf "replicaCount is %d but sessions are in memory: each pod would hold its own sessions. Turn on redis.enabled or set redis.external (sessions.store: redis), or use 1 replica" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (not $redis) .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1) }}
{{- fail "autoscaling.maxReplicas is above 1 but sessions are in memory: turn on redis.enabled or set redis.external (sessions.store: redis)" }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- fail "redis: use either redis.enabled (Redis in this chart) or redis.external, not both" }}
{{- end }}
{{- if and .Values.redis.external.url .Values.redis.external.existingSecret }}
{{- fail "redis.external: give url or existingSecret, not both" }}
{{- end }}
{{- if and .Values.redis.external.url (not (regexMatch "^rediss?://" .Values.redis.external.url)) }}
{{- fail "redis.external.url must start with redis:// or rediss://" }}
{{- end }}
{{- if eq (include "ratatosk.mcpPort" .) (include "ratatosk.adminPort" .) }}
{{- fail "config: `listen` and `admin_listen` must use different ports" }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- $known := fromJsonArray (include "ratatosk.envNames" .) }}
{{- range regexFindAll "\\$?\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}" .Values.config -1 }}
{{- if not (hasPrefix "$$" .) }}
{{- $name := trimSuffix "}" (trimPrefix "${" .) }}
{{- if not (has $name $known) }}
{{- fail (printf "config reads ${%s} but the pod has no such variable: add it to secrets.env (or extraEnv), or use ${%s:-default}" $name $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (null the other)" }}
{{- end }}
{{- end }}
