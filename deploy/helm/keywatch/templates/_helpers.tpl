{{/* The release's resource name: the release name, with "-keywatch" unless it has it. */}}
{{- define "keywatch.fullname" -}}
{{- if contains "keywatch" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-keywatch" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keywatch.selectorLabels" -}}
app.kubernetes.io/name: keywatch
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keywatch.labels" -}}
{{ include "keywatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "keywatch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* keywatch.toml as mounted: the chart's state_dir, the user's config, the chart's server. */}}
{{- define "keywatch.config" -}}
# Made by the keywatch chart: state_dir and [server] are the chart's, the rest is
# .Values.config.
state_dir = "/var/lib/keywatch"

{{ .Values.config }}
[server]
enabled = true
listen = "0.0.0.0:{{ .Values.port }}"
{{- end -}}

{{/* keywatch.toml and the rule files (one file each: the image's templates stay), the
state volume, and /tmp (the root file system is read-only). */}}
{{- define "keywatch.mounts" -}}
- name: config
  mountPath: /etc/keywatch/keywatch.toml
  subPath: keywatch.toml
{{- range list "policy.toml" "routes.toml" "keys.toml" }}
- name: config
  mountPath: /etc/keywatch/rules/{{ . }}
  subPath: {{ . }}
{{- end }}
- name: state
  mountPath: /var/lib/keywatch
- name: tmp
  mountPath: /tmp
{{- end -}}
