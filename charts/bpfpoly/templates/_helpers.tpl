{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "bpfpoly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Base of every object name: "<release>-<chart>", or the release name when it already
contains the chart name. 50 characters leave room for "-operator" etc.
*/}}
{{- define "bpfpoly.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "bpfpoly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "bpfpoly.labels" -}}
helm.sh/chart: {{ include "bpfpoly.chart" . }}
{{ include "bpfpoly.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bpfpoly
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "bpfpoly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bpfpoly.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Per component: include "bpfpoly.componentLabels" (list . "operator") */}}
{{- define "bpfpoly.componentLabels" -}}
{{ include "bpfpoly.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "bpfpoly.componentSelectorLabels" -}}
{{ include "bpfpoly.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "bpfpoly.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "bpfpoly.operator.fullname" -}}
{{- printf "%s-operator" (include "bpfpoly.fullname" .) -}}
{{- end -}}

{{- define "bpfpoly.agent.fullname" -}}
{{- printf "%s-agent" (include "bpfpoly.fullname" .) -}}
{{- end -}}

{{- define "bpfpoly.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "bpfpoly.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "bpfpoly.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (include "bpfpoly.agent.fullname" .) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Chart-wide checks that the schema cannot express. */}}
{{- define "bpfpoly.validate" -}}
{{- if and (not .Values.operator.leaderElection.enabled) (gt (int .Values.operator.replicas) 1) -}}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled: two operators without a Lease would both write node states" -}}
{{- end -}}
{{- end -}}
