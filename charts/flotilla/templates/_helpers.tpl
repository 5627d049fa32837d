{{/* The chart name, overridable. */}}
{{- define "flotilla.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The resource-name prefix: <release>-<chart>, or the release alone when it holds the chart name. */}}
{{- define "flotilla.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "flotilla.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flotilla.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (control-plane or node-agent); pass (list $ "component"). */}}
{{- define "flotilla.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "flotilla.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* An image reference; pass (list $ "flotilla-control-plane"). */}}
{{- define "flotilla.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s:%s" $root.Values.image.repository (index . 1) (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end -}}

{{/* The control plane's in-cluster gRPC URL, which agents dial. */}}
{{/* The Secret with the control plane's serving certificate: the user's, the generated one,
or none (plain gRPC). */}}
{{- define "flotilla.controlPlaneTLSSecret" -}}
{{- if .Values.tls.controlPlaneSecret -}}
{{- .Values.tls.controlPlaneSecret -}}
{{- else if .Values.tls.generate -}}
{{- printf "%s-control-plane-tls" (include "flotilla.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.controlPlaneURL" -}}
{{- $scheme := ternary "https" "http" (not (empty (include "flotilla.controlPlaneTLSSecret" .))) -}}
{{- printf "%s://%s-control-plane.%s.svc:%v" $scheme (include "flotilla.fullname" .) .Release.Namespace .Values.controlPlane.port -}}
{{- end -}}

{{/* The Secret holding the join token. */}}
{{- define "flotilla.joinTokenSecret" -}}
{{- default (printf "%s-join-token" (include "flotilla.fullname" .)) .Values.joinToken.existingSecret -}}
{{- end -}}

{{/* How users of the user API are authenticated: anonymous, tokens (a token file) or kubernetes
(their own Kubernetes credentials, checked with TokenReview and SubjectAccessReview; needs
store=kubernetes, so the embedded store falls back to tokens). */}}
{{- define "flotilla.userAuthMode" -}}
{{- if .Values.userAuth.insecureAllowAnonymous -}}
anonymous
{{- else if and (eq .Values.userAuth.mode "kubernetes") (eq .Values.controlPlane.store "kubernetes") -}}
kubernetes
{{- else -}}
tokens
{{- end -}}
{{- end -}}

{{/* The Secret holding the user API's token file (and policy), generated unless given. */}}
{{- define "flotilla.usersSecret" -}}
{{- default (printf "%s-users" (include "flotilla.fullname" .)) .Values.userAuth.existingSecret -}}
{{- end -}}

{{/* The join token as an environment variable. */}}
{{- define "flotilla.joinTokenEnv" -}}
- name: FLOTILLA_JOIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "flotilla.joinTokenSecret" . }}
      key: token
{{- end -}}

{{/* The restricted security context every container runs with. */}}
{{- define "flotilla.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
