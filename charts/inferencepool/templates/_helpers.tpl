{{/* The EPP's name (Deployment, Service, ServiceAccount, ConfigMap): <release>-epp. */}}
{{- define "inferencepool.epp.name" -}}
{{- printf "%s-epp" (.Release.Name | lower | trim | trunc 40 | trimSuffix "-") -}}
{{- end -}}

{{/* The InferencePool's name: the release name, as in the reference chart. */}}
{{- define "inferencepool.pool.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferencepool.labels" -}}
app.kubernetes.io/name: {{ include "inferencepool.epp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: inferencepool
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "inferencepool.selectorLabels" -}}
inferencepool: {{ include "inferencepool.epp.name" . }}
{{- end -}}

{{/* API group of the pool: inference.networking.k8s.io (v1) or inference.networking.x-k8s.io (v1alpha2). */}}
{{- define "inferencepool.pool.group" -}}
{{- (split "/" .Values.inferencePool.apiVersion)._0 -}}
{{- end -}}

{{- define "inferencepool.pool.isV1" -}}
{{- if eq .Values.inferencePool.apiVersion "inference.networking.k8s.io/v1" }}true{{ end -}}
{{- end -}}

{{/* Leader election: inferenceExtension.leaderElection when set, else on with more than one replica (the
     reference chart's rule). */}}
{{- define "inferencepool.leaderElection" -}}
{{- $v := .Values.inferenceExtension.leaderElection -}}
{{- if kindIs "invalid" $v -}}
{{- if gt (int .Values.inferenceExtension.replicas) 1 }}true{{ end -}}
{{- else if $v }}true{{ end -}}
{{- end -}}

{{/* The image reference: [registry/]repository:tag, tag defaulting to the chart's appVersion. */}}
{{- define "inferencepool.epp.image" -}}
{{- $img := .Values.inferenceExtension.image -}}
{{- $repo := $img.repository -}}
{{- if $img.registry }}{{ $repo = printf "%s/%s" $img.registry $img.repository }}{{ end -}}
{{- printf "%s:%s" $repo (($img.tag | default .Chart.AppVersion) | toString) -}}
{{- end -}}

{{/* The plugin-configuration file the EPP loads: pluginsConfigFile if set, else <profile>.yaml. */}}
{{- define "inferencepool.configFile" -}}
{{- .Values.inferenceExtension.pluginsConfigFile | default (printf "%s.yaml" .Values.inferenceExtension.profile) -}}
{{- end -}}

{{/* The ConfigMap's data: every shipped profile (files/profiles/*.yaml) plus pluginsCustomConfig. */}}
{{- define "inferencepool.configData" -}}
{{- $data := dict -}}
{{- range $path, $_ := .Files.Glob "files/profiles/*.yaml" -}}
{{- $_ := set $data (base $path) ($.Files.Get $path) -}}
{{- end -}}
{{- range $name, $text := .Values.inferenceExtension.pluginsCustomConfig -}}
{{- $_ := set $data $name $text -}}
{{- end -}}
{{- toYaml $data -}}
{{- end -}}

{{/* Whether the chart renders the Gateway / the HTTPRoute: explicit true/false wins; unset (null) means
     yes for the providers whose only extra resources they are (envoy-gateway, kgateway). */}}
{{- define "inferencepool.gatewayWanted" -}}
{{- $v := .Values.inferenceGateway.create -}}
{{- if kindIs "invalid" $v -}}
{{- if has .Values.provider.name (list "envoy-gateway" "kgateway") }}true{{ end -}}
{{- else if $v }}true{{ end -}}
{{- end -}}

{{- define "inferencepool.routeWanted" -}}
{{- $v := .Values.experimentalHttpRoute.enabled -}}
{{- if kindIs "invalid" $v -}}
{{- if has .Values.provider.name (list "envoy-gateway" "kgateway") }}true{{ end -}}
{{- else if $v }}true{{ end -}}
{{- end -}}

{{/* The GatewayClass of the rendered Gateway: inferenceGateway.gatewayClassName, else the provider's. */}}
{{- define "inferencepool.gatewayClassName" -}}
{{- $defaults := dict "istio" "istio" "gke" "gke-l7-regional-external-managed" "envoy-gateway" "eg" "kgateway" "kgateway" -}}
{{- .Values.inferenceGateway.gatewayClassName | default (get $defaults .Values.provider.name) -}}
{{- end -}}

{{/* Checks that turn a wrong combination of values into an error that says what to set. */}}
{{- define "inferencepool.validate" -}}
{{- if not .Values.inferencePool.modelServers.matchLabels -}}
{{- fail "inferencePool.modelServers.matchLabels is required: the labels of the model-server pods, e.g. --set inferencePool.modelServers.matchLabels.app=my-model-server" -}}
{{- end -}}
{{- $file := include "inferencepool.configFile" . -}}
{{- $data := include "inferencepool.configData" . | fromYaml -}}
{{- if not (hasKey $data $file) -}}
{{- fail (printf "the plugin configuration %q is not in the chart: choose inferenceExtension.profile from %s, or add it under inferenceExtension.pluginsCustomConfig" $file (keys $data | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if and (not (include "inferencepool.pool.isV1" .)) (gt (len .Values.inferencePool.targetPorts) 1) -}}
{{- fail "inferencePool.apiVersion inference.networking.x-k8s.io/v1alpha2 has a single targetPortNumber: give exactly one entry in inferencePool.targetPorts" -}}
{{- end -}}
{{- if and (include "inferencepool.gatewayWanted" .) (not (include "inferencepool.gatewayClassName" .)) -}}
{{- fail "inferenceGateway.create needs a GatewayClass: set inferenceGateway.gatewayClassName (provider.name none has no default class)" -}}
{{- end -}}
{{- end -}}
