{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "meshbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name when it already contains the chart name, else
<release>-<chart>. Truncated to 52 characters so that suffixes such as "-webhook" and
"-validate" keep every derived name within 63.
*/}}
{{- define "meshbridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "meshbridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "meshbridge.labels" -}}
helm.sh/chart: {{ include "meshbridge.chart" . }}
{{ include "meshbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshbridge
{{- end }}

{{/*
Labels selecting the control-plane pods (stable across upgrades).
*/}}
{{- define "meshbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "meshbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshbridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image.
*/}}
{{- define "meshbridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Names of the Services and webhook objects.
*/}}
{{- define "meshbridge.xdsServiceName" -}}
{{- printf "%s-xds" (include "meshbridge.fullname" .) }}
{{- end }}

{{- define "meshbridge.adminServiceName" -}}
{{- printf "%s-admin" (include "meshbridge.fullname" .) }}
{{- end }}

{{- define "meshbridge.peersServiceName" -}}
{{- printf "%s-peers" (include "meshbridge.fullname" .) }}
{{- end }}

{{- define "meshbridge.webhookServiceName" -}}
{{- printf "%s-webhook" (include "meshbridge.fullname" .) }}
{{- end }}

{{- define "meshbridge.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "meshbridge.fullname" .) }}
{{- end }}

{{/*
Whether Helm or cert-manager provides the webhook certificate Secret (mounted into the pod):
"true" when the webhook is on and meshbridge does not manage its own certificate.
*/}}
{{- define "meshbridge.webhookCertFromSecret" -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.selfManaged) }}true{{ end }}
{{- end }}

{{/*
Pod terminationGracePeriodSeconds: the value given, else the drain rounded up to seconds
plus 10. It must exceed the drain, or the kubelet kills meshbridge mid-drain.
*/}}
{{- define "meshbridge.terminationGracePeriodSeconds" -}}
{{- $drainSeconds := div (add (int .Values.drainMs) 999) 1000 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drainSeconds 10 }}
{{- else }}
{{- $given := int .Values.terminationGracePeriodSeconds }}
{{- if le (mul $given 1000) (int .Values.drainMs) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than drainMs (%d ms)" $given (int .Values.drainMs)) }}
{{- end }}
{{- $given }}
{{- end }}
{{- end }}

{{/*
The Secret holding the xDS serving certificate: xds.tls.secretName, else the one cert-manager
writes when xds.tls.certManager.enabled; empty: plaintext xDS.
*/}}
{{- define "meshbridge.xdsTlsSecret" -}}
{{- if .Values.xds.tls.secretName }}
{{- .Values.xds.tls.secretName }}
{{- else if .Values.xds.tls.certManager.enabled }}
{{- printf "%s-xds-tls" (include "meshbridge.fullname" .) }}
{{- end }}
{{- end }}
