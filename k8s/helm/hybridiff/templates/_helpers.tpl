{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "hybridiff.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name used for every object. */}}
{{- define "hybridiff.fullname" -}}
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

{{- define "hybridiff.coordinatorName" -}}
{{- printf "%s-coordinator" (include "hybridiff.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hybridiff.workerName" -}}
{{- printf "%s-worker" (include "hybridiff.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hybridiff.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "hybridiff.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hybridiff
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one role: include "hybridiff.selectorLabels" (list . "worker") */}}
{{- define "hybridiff.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "hybridiff.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The label the coordinator's discovery selects worker pods by (one KEY=VALUE). */}}
{{- define "hybridiff.poolLabelKey" -}}hybridiff/pool{{- end }}
{{- define "hybridiff.poolLabelValue" -}}{{ include "hybridiff.workerName" . }}{{- end }}

{{- define "hybridiff.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "hybridiff.modelClaimName" -}}
{{- default (printf "%s-models" (include "hybridiff.fullname" .)) .Values.model.pvc.claimName }}
{{- end }}

{{- define "hybridiff.modelDir" -}}
{{- if eq .Values.model.source "tiny" -}}
/models/tiny-{{ .Values.model.tiny.arch }}
{{- else if eq .Values.model.source "hf" -}}
{{ .Values.model.hf.id }}{{ with .Values.model.hf.revision }}@{{ . }}{{ end }}
{{- else -}}
/models/{{ .Values.model.pvc.path | trimPrefix "/" }}
{{- end -}}
{{- end }}

{{- define "hybridiff.authSecretName" -}}
{{- default (printf "%s-auth" (include "hybridiff.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The security switches once `insecure` (a demo: every one off) is applied: "true" or "". */}}
{{- define "hybridiff.auth" -}}
{{- if and .Values.auth.enabled (not .Values.insecure) }}true{{ end }}
{{- end }}
{{- define "hybridiff.adminAuth" -}}
{{- if and (include "hybridiff.auth" .) .Values.auth.admin.enabled }}true{{ end }}
{{- end }}
{{- define "hybridiff.controlTLS" -}}
{{- if and .Values.controlTLS.enabled (not .Values.insecure) }}true{{ end }}
{{- end }}
{{- define "hybridiff.curve" -}}
{{- if and .Values.curve.enabled (not .Values.insecure) }}true{{ end }}
{{- end }}

{{/* Downward-API env shared by both roles, plus OpenTelemetry settings. */}}
{{- define "hybridiff.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_EXPORTER_OTLP_INSECURE
  value: {{ $.Values.otel.insecure | quote }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),service.instance.id=$(POD_NAME)%s" (ternary (printf ",%s" .Values.otel.resourceAttributes) "" (ne .Values.otel.resourceAttributes "")) | quote }}
{{- end }}

{{/* Model source checks, so that a bad value fails at render time and not in the cluster. */}}
{{- define "hybridiff.validate" -}}
{{- if not (has .Values.model.source (list "tiny" "pvc" "hf")) }}
{{- fail (printf "model.source must be tiny, pvc or hf, got %q" .Values.model.source) }}
{{- end }}
{{- if and (eq .Values.model.source "hf") (not .Values.model.hf.id) }}
{{- fail "model.source=hf needs model.hf.id (ORG/NAME)" }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) (not .Values.model.pvc.create) }}
{{- fail "model.source=pvc needs model.pvc.claimName or model.pvc.create=true" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and (not .Values.auth.enabled) (not .Values.insecure) }}
{{- fail "auth.enabled=false serves the API without authentication: set insecure=true to mean it" }}
{{- end }}
{{- if and (not .Values.worker.dataPeerCidrs) (not .Values.insecure) }}
{{- fail "worker.dataPeerCidrs is empty (workers would push frames to any address): set it to the pod CIDR, or insecure=true" }}
{{- end }}
{{- if and (include "hybridiff.controlTLS" .) (not (and .Values.controlTLS.coordinatorSecretName .Values.controlTLS.workerSecretName)) }}
{{- fail "controlTLS.enabled needs controlTLS.coordinatorSecretName and controlTLS.workerSecretName" }}
{{- end }}
{{- if and (include "hybridiff.curve" .) (not .Values.curve.secretName) }}
{{- fail "curve.enabled needs curve.secretName (a Secret with pool.key and pool.key_secret)" }}
{{- end }}
{{- end }}

{{/* imagePullSecrets of a pod: the release's and the role's. */}}
{{- define "hybridiff.imagePullSecrets" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- with concat ($root.Values.imagePullSecrets | default list) ($role.imagePullSecrets | default list) }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod-level settings both roles take from values: include "hybridiff.podExtras" (list . .Values.worker "worker") */}}
{{- define "hybridiff.podExtras" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $name := index . 2 -}}
{{- include "hybridiff.imagePullSecrets" (list $root $role) }}
{{- with $role.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $role.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- $spread := list }}
{{- if and (eq $name "worker") $role.topologySpread.enabled }}
{{- $spread = append $spread (dict "maxSkew" (int $role.topologySpread.maxSkew) "topologyKey" $role.topologySpread.topologyKey "whenUnsatisfiable" $role.topologySpread.whenUnsatisfiable) }}
{{- end }}
{{- $spread = concat $spread ($role.topologySpreadConstraints | default list) }}
{{- with $spread }}
topologySpreadConstraints:
{{- range . }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "hybridiff.selectorLabels" (list $root $name) | fromYaml)) }}
{{- end }}
  - {{ toYaml $c | nindent 4 | trim }}
{{- end }}
{{- end }}
{{- end }}

{{/* Label matchers that scope the alert expressions to this release's namespace. */}}
{{- define "hybridiff.promSelector" -}}
namespace="{{ .Release.Namespace }}"
{{- end }}

{{/* `for` and labels of one alert: include "hybridiff.alertMeta" (list $ $ruleValues) */}}
{{- define "hybridiff.alertMeta" -}}
{{- $root := index . 0 -}}
{{- $rule := index . 1 -}}
{{- with $rule.for }}
for: {{ . }}
{{- end }}
labels:
  severity: {{ $rule.severity }}
  {{- with $root.Values.monitoring.prometheusRule.additionalAlertLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
