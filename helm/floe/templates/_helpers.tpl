{{/* Names, labels and the pieces every workload shares. */}}

{{- define "floe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "floe.fullname" -}}
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

{{/* "<fullname>-<component>", e.g. floe-signal. Call with (list $ "signal"). */}}
{{- define "floe.component" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "floe.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) }}
{{- end }}

{{- define "floe.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: floe
{{ include "floe.selectorLabels" . }}
{{- end }}

{{- define "floe.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "floe.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "floe.image" -}}
{{- include "floe.imageRef" (list . .Values.image .Chart.AppVersion) }}
{{- end }}

{{/*
  An image reference, (list . $image $defaultTag): global.imageRegistry
  replaces the registry of $image.repository (a mirror keeps the path), and
  $image.digest, when set, pins it instead of the tag.
*/}}
{{- define "floe.imageRef" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $repo := $image.repository }}
{{- with $root.Values.global.imageRegistry }}
{{- $parts := splitList "/" $repo }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $repo = join "/" (rest $parts) }}
{{- end }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repo $image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default (index . 2) $image.tag) }}
{{- end }}
{{- end }}

{{/*
  What every floe pod spec starts with, (list . $component): pull secrets,
  service account, priority class and security context.
*/}}
{{- define "floe.podBasics" -}}
{{- $root := index . 0 }}
{{- $c := index . 1 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with include "floe.serviceAccountName" $root }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: false
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The service account floe's pods run as ("" for the namespace's default). */}}
{{- define "floe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "floe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding floe's own secrets (generated or given). */}}
{{- define "floe.secretName" -}}
{{- default (include "floe.component" (list . "secrets")) .Values.secrets.existingSecret }}
{{- end }}

{{- define "floe.redisSecretName" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- include "floe.secretName" . }}
{{- end }}
{{- end }}

{{- define "floe.redisSecretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.existingSecret }}
{{- .Values.redis.existingSecretKey }}
{{- else }}
{{- "redis-password" }}
{{- end }}
{{- end }}

{{/* Whether the Redis connection has a password. */}}
{{- define "floe.redisAuth" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth }}true{{ end }}
{{- else if or .Values.redis.existingSecret .Values.redis.password }}true{{ end }}
{{- end }}

{{/* Whether any Redis is configured (in-chart or external). */}}
{{- define "floe.hasRedis" -}}
{{- if or .Values.redis.enabled .Values.redis.url }}true{{ end }}
{{- end }}

{{- define "floe.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "floe.component" (list . "redis")) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{- define "floe.controlUrl" -}}
{{- printf "http://%s:%d" (include "floe.component" (list . "control-plane")) (int .Values.controlPlane.port) }}
{{- end }}

{{/* Env shared by every component: logs, and the Redis password when used. */}}
{{- define "floe.commonEnv" -}}
- name: FLOE_LOG
  value: {{ .Values.log.level | quote }}
- name: FLOE_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
{{- end }}

{{/* Where Redis is, its password and the CA of its TLS certificate. */}}
{{- define "floe.redisEnv" -}}
{{- if include "floe.redisAuth" . }}
- name: FLOE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "floe.redisSecretName" . }}
      key: {{ include "floe.redisSecretKey" . }}
{{- end }}
{{- if .Values.redis.caSecret }}
- name: FLOE_REDIS_CA_FILE
  value: {{ printf "/etc/floe/redis-ca/%s" .Values.redis.caSecretKey | quote }}
{{- end }}
{{- end }}

{{/* The Secret holding the CA of an external Redis's TLS certificate. */}}
{{- define "floe.redisCaVolume" -}}
{{- if .Values.redis.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.caSecret }}
    defaultMode: 0444
{{- end }}
{{- end }}

{{- define "floe.redisCaMount" -}}
{{- if .Values.redis.caSecret }}
- name: redis-ca
  mountPath: /etc/floe/redis-ca
  readOnly: true
{{- end }}
{{- end }}

{{/*
  A checksum of the chart Secret's keys a component reads only at start,
  (list . "key" …): its pods restart when one of those changes, and only
  then. TURN reads turn-secrets again by itself, so a rotation restarts no
  TURN pod, and signal and Redis do not read it at all.
*/}}
{{- define "floe.secretsChecksum" -}}
{{- $root := index . 0 -}}
{{- $secret := include (print $root.Template.BasePath "/secret.yaml") $root | fromYaml | default dict -}}
{{- $data := $secret.data | default dict -}}
{{- $picked := list -}}
{{- range (rest .) }}
{{- $picked = append $picked (get $data . | default "") -}}
{{- end -}}
{{- join "," $picked | sha256sum -}}
{{- end }}

{{/* The secrets volume, mounted read-only at /etc/floe/secrets. */}}
{{- define "floe.secretsVolume" -}}
- name: secrets
  secret:
    secretName: {{ include "floe.secretName" . }}
    defaultMode: 0440
{{- end }}

{{- define "floe.secretsMount" -}}
- name: secrets
  mountPath: /etc/floe/secrets
  readOnly: true
{{- end }}

{{- define "floe.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{- define "floe.scrapeAnnotations" -}}
{{- $root := index . 0 }}
{{- if $root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Probes on the ops endpoints of port name $port. */}}
{{- define "floe.probes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ . }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ . }}
  initialDelaySeconds: 5
  periodSeconds: 10
  failureThreshold: 6
startupProbe:
  httpGet:
    path: /healthz
    port: {{ . }}
  periodSeconds: 2
  failureThreshold: 30
{{- end }}

{{/* Check what the schema cannot: relations between values. */}}
{{- define "floe.validate" -}}
{{- $turn := .Values.turn }}
{{- if gt (add $turn.relayPorts.first $turn.relayPorts.count) 65536 }}
{{- fail (printf "turn.relayPorts: %d ports from %d run past 65535" (int $turn.relayPorts.count) (int $turn.relayPorts.first)) }}
{{- end }}
{{- if and (ne $turn.exposure "hostNetwork") (gt (int $turn.relayPorts.count) 1000) }}
{{- fail "turn.relayPorts.count: a Service can expose at most 1000 relay ports; use exposure hostNetwork for more" }}
{{- end }}
{{- if and (eq $turn.exposure "nodePort") (or (lt (int $turn.relayPorts.first) 30000) (gt (add $turn.relayPorts.first $turn.relayPorts.count) 32768)) }}
{{- fail "turn.relayPorts must lie in the NodePort range 30000-32767 when turn.exposure is nodePort" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled .Values.turn.enabled (eq $turn.exposure "hostNetwork") (not .Values.networkPolicy.nodeCIDRs) }}
{{- fail "networkPolicy.nodeCIDRs: TURN on the host network calls the control plane from node addresses; list the nodes' CIDRs" }}
{{- end }}
{{- if and $turn.spoolHostPath (ne $turn.exposure "hostNetwork") }}
{{- fail "turn.spoolHostPath needs turn.exposure=hostNetwork (one TURN pod per node holds the folder; a second one on the node could not start)" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.caSecret }}
{{- fail "redis.caSecret is for an external rediss:// Redis (redis.enabled=false, redis.url)" }}
{{- end }}
{{- if and .Values.redis.caSecret (not (hasPrefix "rediss" .Values.redis.url)) }}
{{- fail "redis.caSecret needs a rediss:// or rediss+sentinel:// redis.url" }}
{{- end }}
{{- if and (not (include "floe.hasRedis" .)) (or (eq .Values.controlPlane.store "redis") (gt (int .Values.signal.replicas) 1) .Values.signal.autoscaling.enabled) }}
{{- fail "several signal replicas and controlPlane.store=redis need Redis: set redis.enabled or redis.url" }}
{{- end }}
{{- end }}
