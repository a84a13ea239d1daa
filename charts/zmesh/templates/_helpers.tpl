{{/*
Labels every object of the release carries besides its own (tests/helm_chart.rs strips
exactly these when it compares the chart with examples/kubernetes).
*/}}
{{- define "zmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "zmesh.image" -}}
image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* The CA's Service name, as agents dial it and as its serving certificate names it. */}}
{{- define "zmesh.caHost" -}}
zmesh-ca.{{ .Release.Namespace }}.svc
{{- end }}

{{/*
The proxy's ports and the probes on them: on the agent's container, or on the data path's
when it runs apart (datapath.separate).
*/}}
{{- define "zmesh.proxyPortsAndProbes" -}}
ports:
  - name: hbone
    containerPort: 15008
    protocol: TCP
  - name: metrics
    containerPort: 15020
    protocol: TCP
  - name: readiness
    containerPort: 15021
    protocol: TCP
{{- with .Values.agent.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.agent.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
