{{/*
Shared naming, labels and the pieces of the vLLM pod that the Deployment and the
LeaderWorkerSet (leader and workers) have in common.
*/}}

{{- define "vllm-ffnskip.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full object name. Never plain "vllm": Kubernetes would inject VLLM_PORT=tcp://...
into pods with service links, which vLLM reads as its own port setting.
*/}}
{{- define "vllm-ffnskip.fullname" -}}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $base := default .Chart.Name .Values.nameOverride }}
{{- if contains $base .Release.Name }}
{{- $name = .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name = printf "%s-%s" .Release.Name $base | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- if eq (lower $name) "vllm" }}
{{- fail "the object name must not be plain \"vllm\": a Service called vllm makes Kubernetes set VLLM_PORT=tcp://... in pods, which breaks vLLM; choose another fullnameOverride/nameOverride" }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "vllm-ffnskip.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vllm-ffnskip.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-ffnskip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vllm-ffnskip.labels" -}}
helm.sh/chart: {{ include "vllm-ffnskip.chart" . }}
{{ include "vllm-ffnskip.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The pods that serve HTTP: the Deployment's, or the LeaderWorkerSet leaders. */}}
{{- define "vllm-ffnskip.servingComponent" -}}
{{- if .Values.multiNode.enabled }}leader{{ else }}server{{ end }}
{{- end }}

{{- define "vllm-ffnskip.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-ffnskip.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vllm-ffnskip.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "vllm-ffnskip.pvcName" -}}
{{- default (printf "%s-model-cache" (include "vllm-ffnskip.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}

{{- define "vllm-ffnskip.policyMountPath" -}}
/etc/vllm-ffnskip/policies
{{- end }}

{{/* GPUs per pod: all of TP x PP on one node; TP per pod across nodes (PP spans the group). */}}
{{- define "vllm-ffnskip.gpusPerPod" -}}
{{- $tp := int .Values.tensorParallelSize }}
{{- $pp := int .Values.pipelineParallelSize }}
{{- if .Values.multiNode.enabled }}
{{- if ne $pp (int .Values.multiNode.size) }}
{{- fail (printf "multiNode.size (%d) must equal pipelineParallelSize (%d): each pod holds tensorParallelSize GPUs (TP inside a node, PP across nodes)" (int .Values.multiNode.size) $pp) }}
{{- end }}
{{- $tp }}
{{- else }}
{{- mul $tp $pp }}
{{- end }}
{{- end }}

{{/* Sanity checks the schema cannot express. */}}
{{- define "vllm-ffnskip.validate" -}}
{{- if and .Values.multiNode.enabled (eq .Values.modelCache.type "persistentVolumeClaim") (not .Values.modelCache.existingClaim) (not (has "ReadWriteMany" .Values.modelCache.accessModes)) }}
{{- fail "multiNode with a chart-created model cache PVC needs modelCache.accessModes to include ReadWriteMany (every pod of a group mounts it)" }}
{{- end }}
{{- end }}

{{/*
--additional-config JSON: {"ffnskip": <the ffnskip values that are set>}. Null keys (the chart's
defaults for threshold, warmup, cold_start, cold_end, span and policy_file) are left out, so the
plugin's own default applies to them, or, with a policy_file, the file's values: a rendered key
would override the file's (threshold: its per-layer thresholds).
*/}}
{{- define "vllm-ffnskip.additionalConfig" -}}
{{- $policy := dict }}
{{- range $key, $value := .Values.ffnskip }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $policy $key $value }}
{{- end }}
{{- end }}
{{- dict "ffnskip" $policy | toJson }}
{{- end }}

{{/* Arguments of `vllm serve`: MODEL --model-impl ffnskip ... (a YAML list). */}}
{{- define "vllm-ffnskip.serveArgs" -}}
- {{ .Values.model | quote }}
- --model-impl
- ffnskip
- --host
- "0.0.0.0"
- --port
- "8000"
- --tensor-parallel-size
- {{ .Values.tensorParallelSize | int | quote }}
- --pipeline-parallel-size
- {{ .Values.pipelineParallelSize | int | quote }}
{{- if .Values.multiNode.enabled }}
- --distributed-executor-backend
- ray
{{- end }}
- --additional-config
- {{ include "vllm-ffnskip.additionalConfig" . | quote }}
{{- if .Values.servedModelName }}
- --served-model-name
- {{ .Values.servedModelName | quote }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | toString | quote }}
{{- end }}
{{- end }}

{{/* Pod template annotations; the checksum rolls the pods when a policy file changes. */}}
{{- define "vllm-ffnskip.podAnnotations" -}}
{{- $serving := index . 1 }}
{{- with index . 0 }}
{{- if .Values.policyFiles }}
checksum/policy-files: {{ toJson .Values.policyFiles | sha256sum }}
{{- end }}
{{- if and $serving .Values.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: "8000"
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Container env shared by every vLLM/Ray container. */}}
{{- define "vllm-ffnskip.env" -}}
- name: HF_HOME
  value: {{ .Values.modelCache.mountPath | quote }}
{{- if .Values.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hfTokenSecret | quote }}
      key: {{ .Values.hfTokenSecretKey | quote }}
{{- end }}
{{- if .Values.apiKeySecret }}
- name: VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKeySecret | quote }}
      key: {{ .Values.apiKeySecretKey | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vllm-ffnskip.resources" -}}
{{- $res := deepCopy (default (dict) .Values.resources) }}
{{- $limits := default (dict) (get $res "limits") }}
{{- $_ := set $limits .Values.gpuResourceName (include "vllm-ffnskip.gpusPerPod" . | int) }}
{{- $_ := set $res "limits" $limits }}
{{- toYaml $res }}
{{- end }}

{{- define "vllm-ffnskip.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath | quote }}
{{- if .Values.policyFiles }}
- name: policy-files
  mountPath: {{ include "vllm-ffnskip.policyMountPath" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vllm-ffnskip.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize | quote }}
- name: model-cache
{{- if eq .Values.modelCache.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ include "vllm-ffnskip.pvcName" . }}
{{- else }}
  emptyDir:
    {{- with .Values.modelCache.size }}
    sizeLimit: {{ . | quote }}
    {{- end }}
{{- end }}
{{- if .Values.policyFiles }}
- name: policy-files
  configMap:
    name: {{ include "vllm-ffnskip.fullname" . }}-policies
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every pod spec (indent as a pod spec body). */}}
{{- define "vllm-ffnskip.podSpecCommon" -}}
# Service links would inject <SERVICE>_PORT=tcp://... env vars; VLLM_PORT breaks vLLM.
enableServiceLinks: false
automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
{{- with (include "vllm-ffnskip.serviceAccountName" .) }}
serviceAccountName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds | int }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . | quote }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "vllm-ffnskip.volumes" . | nindent 2 }}
{{- end }}

{{/* Container fields shared by every vLLM/Ray container (indent as a container body). */}}
{{- define "vllm-ffnskip.containerCommon" -}}
image: {{ include "vllm-ffnskip.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
env:
  {{- include "vllm-ffnskip.env" . | nindent 2 }}
resources:
  {{- include "vllm-ffnskip.resources" . | nindent 2 }}
volumeMounts:
  {{- include "vllm-ffnskip.volumeMounts" . | nindent 2 }}
{{- end }}

{{/* HTTP port and /health probes of the serving container. */}}
{{- define "vllm-ffnskip.servingPortAndProbes" -}}
ports:
  - name: http
    containerPort: 8000
    protocol: TCP
startupProbe:
  httpGet:
    path: /health
    port: http
  {{- toYaml .Values.startupProbe | nindent 2 }}
livenessProbe:
  httpGet:
    path: /health
    port: http
  {{- toYaml .Values.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet:
    path: /health
    port: http
  {{- toYaml .Values.readinessProbe | nindent 2 }}
{{- end }}
