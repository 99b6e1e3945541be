{{/* Names.  Everything is prefixed with the release's fullname. */}}
{{- define "csi-virtvol.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "csi-virtvol.controllerName" -}}{{ include "csi-virtvol.fullname" . }}-controller{{- end -}}
{{- define "csi-virtvol.nodeName" -}}{{ include "csi-virtvol.fullname" . }}-node{{- end -}}
{{- define "csi-virtvol.copyName" -}}{{ include "csi-virtvol.fullname" . }}-copy{{- end -}}

{{- define "csi-virtvol.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "csi-virtvol.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "csi-virtvol.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The driver name with dots as dashes, as the sidecars name their Leases. */}}
{{- define "csi-virtvol.driverSlug" -}}{{ .Values.driverName | replace "." "-" }}{{- end -}}

{{- define "csi-virtvol.pluginDir" -}}{{ .Values.node.kubeletDir }}/plugins/{{ .Values.driverName }}{{- end -}}

{{/* Plural names of the chart's CRDs (crds/*.yaml), as a JSON list. */}}
{{- define "csi-virtvol.crdPlurals" -}}
{{- $out := list -}}
{{- range $path, $_ := .Files.Glob "crds/*.yaml" -}}
{{- $crd := fromYaml ($.Files.Get $path) -}}
{{- $out = append $out $crd.spec.names.plural -}}
{{- end -}}
{{- $out | sortAlpha | toJson -}}
{{- end -}}

{{- /*
The groupsnapshot.storage.k8s.io apiVersion of the VolumeGroupSnapshotClass, or ""
when group snapshots are off (volumeGroupSnapshotClass.create false, or auto and
the cluster serves none of v1, v1beta2, v1beta1).
*/ -}}
{{- define "csi-virtvol.groupSnapshotApiVersion" -}}
{{- $g := .Values.volumeGroupSnapshotClass -}}
{{- $mode := toString $g.create -}}
{{- $found := "" -}}
{{- range list "v1" "v1beta2" "v1beta1" -}}
{{- $v := printf "groupsnapshot.storage.k8s.io/%s" . -}}
{{- if and (not $found) ($.Capabilities.APIVersions.Has $v) -}}{{- $found = $v -}}{{- end -}}
{{- end -}}
{{- if eq $mode "true" -}}
{{- $g.apiVersion | default $found | default "groupsnapshot.storage.k8s.io/v1" -}}
{{- else if and (eq $mode "auto") $found -}}
{{- $g.apiVersion | default $found -}}
{{- end -}}
{{- end -}}
