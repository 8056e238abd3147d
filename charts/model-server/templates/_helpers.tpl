{{- define "model-server.name" -}}
{{- printf "%s-model-server" (.Release.Name | lower | trim | trunc 40 | trimSuffix "-") -}}
{{- end -}}

{{/* The labels an InferencePool selects: app=<release>-model-server, and the engine type the EPP's
     metrics extractor reads (every engine here exposes vLLM's metric names). */}}
{{- define "model-server.selectorLabels" -}}
app: {{ include "model-server.name" . }}
{{- end -}}

{{- define "model-server.labels" -}}
app.kubernetes.io/name: {{ include "model-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: model-server
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "model-server.image" -}}
{{- $img := ternary .Values.image.vllm .Values.image.cpu (eq .Values.engine "vllm") -}}
{{- $repo := $img.repository -}}
{{- if $img.registry }}{{ $repo = printf "%s/%s" $img.registry $img.repository }}{{ end -}}
{{- printf "%s:%s" $repo (($img.tag | default .Chart.AppVersion) | toString) -}}
{{- end -}}

{{/* The model name in metrics and KV-event topics: the first served name, else the model. */}}
{{- define "model-server.servedName" -}}
{{- if .Values.servedModelNames }}{{ first .Values.servedModelNames }}{{ else }}{{ .Values.model }}{{ end -}}
{{- end -}}

{{/* vLLM's --kv-events-config JSON. $(POD_IP) is expanded by the kubelet from the container's env. */}}
{{- define "model-server.kvEventsConfig" -}}
{{- $kv := .Values.kvEvents -}}
{{- $cfg := dict "enable_kv_cache_events" true "publisher" "zmq" "endpoint" (printf "tcp://*:%d" (int $kv.port)) "replay_endpoint" (printf "tcp://*:%d" (int $kv.replayPort)) "topic" (printf "kv@$(POD_IP):%d@%s" (int .Values.port) (include "model-server.servedName" .)) -}}
{{- toJson $cfg -}}
{{- end -}}
