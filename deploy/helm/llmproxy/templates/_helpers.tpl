{{- define "llmproxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmproxy.labels" -}}
{{ include "llmproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The proxy's config: the values' config, with the listen port and the shutdown timings the pod relies on. */}}
{{- define "llmproxy.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $server := mergeOverwrite (deepCopy (default dict $config.server)) (dict
      "listen" (printf ":%d" (int .Values.containerPort))
      "shutdown_delay" (printf "%ds" (int .Values.shutdown.delaySeconds))
      "shutdown_timeout" (printf "%ds" (int .Values.shutdown.timeoutSeconds))) -}}
{{- $_ := set $config "server" $server -}}
{{- toYaml $config -}}
{{- end -}}
