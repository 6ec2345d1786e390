{{/* Chart name, cut to the 63 characters a label value allows. */}}
{{- define "mspc-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; the release name alone when it already contains the chart name. */}}
{{- define "mspc-broker.fullname" -}}
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

{{- define "mspc-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mspc-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mspc-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mspc-broker.labels" -}}
helm.sh/chart: {{ include "mspc-broker.chart" . }}
{{ include "mspc-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mspc-broker
{{- end }}

{{- define "mspc-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mspc-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mspc-broker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The effective value of config.<group>.<field>, or "" when unset. */}}
{{- define "mspc-broker.setting" -}}
{{- $group := index .root.Values.config .group | default dict }}
{{- index $group .field | default "" }}
{{- end }}

{{- define "mspc-broker.storeBackend" -}}
{{- include "mspc-broker.setting" (dict "root" . "group" "store" "field" "backend") | default "vault" }}
{{- end }}

{{- define "mspc-broker.vaultAuthMethod" -}}
{{- include "mspc-broker.setting" (dict "root" . "group" "vault" "field" "auth_method") | default "token" }}
{{- end }}

{{- define "mspc-broker.identityMode" -}}
{{- include "mspc-broker.setting" (dict "root" . "group" "identity" "field" "mode") | default "jwks" }}
{{- end }}

{{/*
One settings value as the string pydantic-settings parses: lists and maps as
JSON, whole numbers without an exponent (YAML numbers reach templates as
float64, and 2592000 would otherwise print as 2.592e+06).
*/}}
{{- define "mspc-broker.envValue" -}}
{{- if or (kindIs "slice" .) (kindIs "map" .) }}
{{- toJson . }}
{{- else if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget API: policy/v1 from Kubernetes 1.21. */}}
{{- define "mspc-broker.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version }}policy/v1{{ else }}policy/v1beta1{{ end }}
{{- end }}

{{/* Fail early on settings that cannot work, with the value to fix. */}}
{{- define "mspc-broker.validate" -}}
{{- $backend := include "mspc-broker.storeBackend" . }}
{{- $auth := include "mspc-broker.vaultAuthMethod" . }}
{{- if eq $backend "vault" }}
{{- if and (eq $auth "token") (not .Values.secrets.vaultToken.existingSecret) }}
{{- fail "config.vault.auth_method=token needs secrets.vaultToken.existingSecret" }}
{{- end }}
{{- if eq $auth "approle" }}
{{- if not .Values.secrets.vaultSecretId.existingSecret }}
{{- fail "config.vault.auth_method=approle needs secrets.vaultSecretId.existingSecret" }}
{{- end }}
{{- if not (include "mspc-broker.setting" (dict "root" . "group" "vault" "field" "role_id")) }}
{{- fail "config.vault.auth_method=approle needs config.vault.role_id" }}
{{- end }}
{{- end }}
{{- if and (eq $auth "kubernetes") (not (include "mspc-broker.setting" (dict "root" . "group" "vault" "field" "kubernetes_role"))) }}
{{- fail "config.vault.auth_method=kubernetes needs config.vault.kubernetes_role" }}
{{- end }}
{{- end }}
{{- if and (eq .Values.audit.volume.type "persistentVolumeClaim") (not .Values.audit.volume.existingClaim) }}
{{- fail "audit.volume.type=persistentVolumeClaim needs audit.volume.existingClaim" }}
{{- end }}
{{- if and .Values.policies.existingConfigMap .Values.policies.files }}
{{- fail "set only one of policies.existingConfigMap and policies.files" }}
{{- end }}
{{- end }}
