{{- define "hifi.fullname" -}}
{{- printf "%s-hifi" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "hifi.labels" -}}
app.kubernetes.io/name: hifi
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hifi.selector" -}}
app.kubernetes.io/name: hifi
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hifi.secretEnv" -}}
{{- $s := .Values.secrets -}}
{{- range $pair := list (list "SENTRY_DSN" $s.sentryDsnKey) (list "HIFI_READ_TOKEN" $s.readTokenKey) (list "HIFI_ADMIN_TOKEN" $s.adminTokenKey) (list "HIFI_REDIS_URL" $s.redisUrlKey) (list "HIFI_ARCHIVE_ACCESS_KEY_ID" $s.archiveAccessKeyIdKey) (list "HIFI_ARCHIVE_SECRET_ACCESS_KEY" $s.archiveSecretAccessKeyKey) }}
{{- if and $s.existingSecret (index $pair 1) }}
- name: {{ index $pair 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.existingSecret }}
      key: {{ index $pair 1 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Sink credentials (issue 19): each environment variable a sink names (`dsn_env`, webhook signing secrets,
auth tokens) from a key of a Secret; set on the sender pods only. */}}
{{- define "hifi.sinkEnv" -}}
{{- range $name, $ref := .Values.secrets.sinkEnv }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secret }}
      key: {{ $ref.key }}
{{- end }}
{{- end -}}

{{/* Whether an autoscaler (an HPA, or KEDA for a sender) owns a workload's replica count. */}}
{{- define "hifi.autoscaled" -}}
{{- if or .stage.autoscaling.enabled (and .sink .root.Values.keda.enabled) }}true{{ end -}}
{{- end -}}

{{/* A consumer stage's workload. Arguments: root, component, args, stage, persistent (it carries RocksDB
state: a StatefulSet with a volume per pod, rolled one pod at a time onto it), sink. A stateless stage is a
Deployment that surges a new pod before it stops an old one. Either way HIFI_WORKER_ID is the pod name, so a
container the kubelet restarts rejoins as the same static member. */}}
{{- define "hifi.consumer" -}}
{{- $root := .root -}}
{{- $autoscaled := include "hifi.autoscaled" . -}}
{{- /* An autoscaled stateful stage leaves its group on SIGTERM: a pod scaled in never comes back, and its
partitions would wait out its session; a rolling restart then rebalances and restores instead. */ -}}
{{- $leave := $root.Values.membership.leaveGroupOnStop -}}
{{- if and .persistent $autoscaled (eq $leave "auto") }}{{ $leave = "yes" }}{{ end -}}
apiVersion: apps/v1
kind: {{ ternary "StatefulSet" "Deployment" .persistent }}
metadata:
  name: {{ include "hifi.fullname" $root }}-{{ .component }}
  labels:
    {{- include "hifi.labels" . | nindent 4 }}
    {{- with .sink }}
    hifi.dev/sink: {{ . }}
    {{- end }}
spec:
  {{- if not $autoscaled }}
  replicas: {{ .stage.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "hifi.selector" . | nindent 6 }}
  {{- if .persistent }}
  serviceName: {{ include "hifi.fullname" $root }}-{{ .component }}
  podManagementPolicy: Parallel
  updateStrategy:
    type: RollingUpdate
    rollingUpdate: {partition: 0, maxUnavailable: {{ $root.Values.podDisruptionBudget.maxUnavailable }}}
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 0, maxSurge: 1}
  {{- end }}
  template:
    {{- include "hifi.podTemplate" (dict "root" $root "component" .component "args" .args "stage" .stage "persistent" .persistent "static" true "leave" $leave "sink" .sink) | nindent 4 }}
  {{- if .persistent }}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: [ReadWriteOnce]
        {{- with .stage.persistence.storageClass }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ .stage.persistence.size }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "hifi.fullname" $root }}-{{ .component }}
  labels:
    {{- include "hifi.labels" . | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "hifi.selector" . | nindent 4 }}
  ports:
    - {name: web, port: {{ .stage.webPort }}, targetPort: web}
  {{- end }}
{{- end -}}

{{/* The pod template every stage shares. Arguments: root, component, args, stage (its values), persistent,
static (a consumer: HIFI_WORKER_ID and membership settings), leave (its HIFI_LEAVE_GROUP_ON_STOP), sink (a
sender: its sink secrets, `secrets.sinkEnv`). */}}

{{- define "hifi.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "hifi.labels" . | nindent 4 }}
  annotations:
    checksum/config: {{ $root.Values.config | sha256sum }}
spec:
  terminationGracePeriodSeconds: {{ add $root.Values.shutdownGraceSeconds 15 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    fsGroup: 10001
  {{- if $root.Values.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "hifi.selector" . | nindent 10 }}
  {{- end }}
  containers:
    - name: hifi
      image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: {{ toJson .args }}
      ports:
        - name: web
          containerPort: {{ .stage.webPort }}
      env:
        - {name: HIFI_CONFIG, value: /etc/hifi/hifi.yaml}
        - {name: HIFI_BROKER, value: {{ $root.Values.kafka.bootstrap | quote }}}
        {{- if not $root.Values.secrets.redisUrlKey }}
        - {name: HIFI_REDIS_URL, value: {{ $root.Values.redis.url | quote }}}
        {{- end }}
        - {name: HIFI_DATA_DIR, value: /home/hifi/var}
        - {name: HIFI_WEB_HOST, value: "0.0.0.0"}
        - name: HIFI_ADVERTISED_HOST  # table lookups are forwarded worker to worker by pod IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        - {name: HIFI_WEB_PORT, value: {{ .stage.webPort | quote }}}
        - {name: HIFI_PARTITIONS, value: {{ $root.Values.kafka.partitions | quote }}}
        - {name: HIFI_REPLICATION, value: {{ $root.Values.kafka.replicationFactor | quote }}}
        - {name: HIFI_MIN_INSYNC, value: {{ $root.Values.kafka.minInsyncReplicas | quote }}}
        - {name: HIFI_NAMESPACE, value: {{ $root.Values.namespacePrefix | quote }}}
        - {name: HIFI_SHUTDOWN_GRACE_S, value: {{ $root.Values.shutdownGraceSeconds | quote }}}
        - {name: HIFI_LOG_LEVEL, value: {{ $root.Values.logLevel | quote }}}
        - {name: HIFI_ENV, value: {{ $root.Values.environment | quote }}}
        {{- if .static }}
        - name: HIFI_WORKER_ID  # the pod name: its consumers' group_instance_id (static membership)
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - {name: HIFI_SESSION_TIMEOUT_S, value: {{ $root.Values.membership.sessionTimeoutSeconds | quote }}}
        - {name: HIFI_LEAVE_GROUP_ON_STOP, value: {{ .leave | quote }}}
        {{- end }}
        {{- include "hifi.secretEnv" $root | nindent 8 }}
        {{- if .sink }}
        {{- include "hifi.sinkEnv" $root | nindent 8 }}
        {{- end }}
      {{- with $root.Values.secrets.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      livenessProbe:
        httpGet: {path: /health, port: web}
        periodSeconds: 10
        failureThreshold: 6
      # Ready = joined its group and restored every owned partition's state: a rollout waits for it.
      readinessProbe:
        httpGet: {path: /ready, port: web}
        periodSeconds: 2
        failureThreshold: 3
      {{- if eq .component "collector" }}
      lifecycle:  # drain: endpoints drop the pod before SIGTERM, so no request is refused mid-rollout
        preStop:
          exec: {command: [sleep, "5"]}
      {{- end }}
      resources:
        {{- toYaml .stage.resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
      volumeMounts:
        - {name: config, mountPath: /etc/hifi, readOnly: true}
        - {name: data, mountPath: /home/hifi/var}
        - {name: tmp, mountPath: /tmp}
  volumes:
    - name: config
      {{- if $root.Values.configSecret }}
      secret:
        secretName: {{ $root.Values.configSecret }}
      {{- else }}
      configMap:
        name: {{ include "hifi.fullname" $root }}-config
      {{- end }}
    - name: tmp
      emptyDir: {}
    {{- if not .persistent }}
    - name: data
      emptyDir: {}
    {{- end }}
{{- end -}}


{{/* The parsed Hifi config, and the dedupe backend it chooses (rocksdb when unset). */}}
{{- define "hifi.dedupeBackend" -}}
{{- $config := fromYaml .Values.config -}}
{{- (($config.dedupe | default dict).backend) | default "rocksdb" -}}
{{- end -}}
