//! etcd, kube-apiserver and kube-controller-manager.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::process::{
    self, Tier, free_port, http_get, mkdir, spawn, spawn_child, wait_until, write,
};
use crate::{Error, KUBECTL_VAR, Result, random_hex};

/// The user name of the cluster's identity outside `system:masters`.
pub const LIMITED_USER: &str = "kiln-limited";
/// The group of that identity, which its FlowSchema matches.
pub const LIMITED_GROUP: &str = "kiln:limited";

/// A running control plane (or an existing one named by a kubeconfig).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// A kubeconfig whose current context is an identity in `system:masters`.
    pub kubeconfig: PathBuf,
    /// A kubeconfig for [`LIMITED_USER`]: not in `system:masters`, no
    /// permission but what every authenticated user has until a test grants
    /// it some with RBAC, and throttled hard by API Priority and Fairness
    /// (a priority level of its own with the fewest seats, rejecting with 429
    /// what does not fit). `None` for an existing cluster started without it.
    pub limited_kubeconfig: Option<PathBuf>,
    /// The kubectl built from the same Kubernetes release as the API server.
    pub kubectl: PathBuf,
    /// The API server's URL.
    pub server: String,
    /// How to stop and start the API server again, for a cluster this
    /// process started.
    api_server: Option<Arc<ApiServer>>,
}

/// The running API server of a cluster this process started.
#[derive(Debug)]
struct ApiServer {
    program: PathBuf,
    args: Vec<OsString>,
    root: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Cluster {
    /// A cluster someone else started, e.g. with `tests/env up`.
    pub(crate) fn existing(kubeconfig: PathBuf) -> Result<Self> {
        let kubectl = match std::env::var_os(KUBECTL_VAR) {
            Some(kubectl) => PathBuf::from(kubectl),
            None => crate::envtest_bin()?.join("kubectl"),
        };
        let server = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "config",
                "view",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.server}",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        Ok(Self {
            kubeconfig,
            kubectl,
            server,
            limited_kubeconfig: std::env::var_os(crate::LIMITED_KUBECONFIG_VAR).map(PathBuf::from),
            api_server: None,
        })
    }

    /// Starts etcd, then kube-apiserver, then kube-controller-manager under
    /// `root`, with the binaries in `bin`, and waits until each is ready.
    pub(crate) fn start(root: &Path, bin: &Path) -> Result<Self> {
        let dir = mkdir(&root.join("cluster"))?;
        let pki = Pki::create(&mkdir(&dir.join("pki"))?)?;
        let kubectl = bin.join("kubectl");

        let etcd_port = start_etcd(root, &dir, bin)?;

        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        let admin_token = random_hex(16);
        let manager_token = random_hex(16);
        let limited_token = random_hex(16);
        // token,user,uid,"groups": two cluster administrators, and one
        // identity that starts with no rights.
        write(
            &dir.join("tokens.csv"),
            format!(
                "{admin_token},kiln-admin,kiln-admin,\"system:masters\"\n\
                 {manager_token},kiln-controller-manager,kiln-controller-manager,\"system:masters\"\n\
                 {limited_token},{LIMITED_USER},{LIMITED_USER},\"{LIMITED_GROUP}\"\n"
            ),
        )?;
        let kubeconfig = dir.join("kubeconfig");
        write(
            &kubeconfig,
            kubeconfig_yaml(&server, &pki.ca_cert, &admin_token),
        )?;
        let limited_kubeconfig = dir.join("limited.kubeconfig");
        write(
            &limited_kubeconfig,
            kubeconfig_yaml(&server, &pki.ca_cert, &limited_token),
        )?;
        let manager_kubeconfig = dir.join("controller-manager.kubeconfig");
        write(
            &manager_kubeconfig,
            kubeconfig_yaml(&server, &pki.ca_cert, &manager_token),
        )?;

        let log = dir.join("kube-apiserver.log");
        let mut command = Command::new(bin.join("kube-apiserver"));
        command
            .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.join("serving").display()))
            .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                pki.serving_key.display()
            ))
            .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                pki.sa_public.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.sa_private.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            .arg("--profiling=false");
        let api_server = Arc::new(ApiServer {
            program: bin.join("kube-apiserver"),
            args: command.get_args().map(OsString::from).collect(),
            root: root.to_path_buf(),
            log: log.clone(),
            child: Mutex::new(None),
        });
        api_server.start()?;
        let cluster = Self {
            kubeconfig,
            kubectl,
            server,
            limited_kubeconfig: Some(limited_kubeconfig),
            api_server: Some(api_server),
        };
        wait_until("kube-apiserver", &log, Duration::from_secs(90), || {
            cluster.kubectl_quiet(&["get", "--raw", "/readyz"])
        })?;
        cluster.throttle_limited_identity(&dir)?;
        cluster.keep_config_map_params(&dir)?;

        let log = dir.join("kube-controller-manager.log");
        spawn(
            "kube-controller-manager",
            Tier::Server,
            Command::new(bin.join("kube-controller-manager"))
                .arg(format!("--kubeconfig={}", manager_kubeconfig.display()))
                // Only what makes the API behave as users expect without nodes:
                // ownerReference cascades, namespace deletion, default service
                // accounts, aggregated cluster roles. No controller writes the status of workloads, so
                // tests can set readiness themselves.
                .arg("--controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller,clusterrole-aggregation-controller")
                .arg("--leader-elect=false")
                .arg("--secure-port=0")
                .arg(format!("--root-ca-file={}", pki.ca_cert.display()))
                .arg("--concurrent-gc-syncs=5"),
            root,
            &log,
        )?;
        // The default service account appears once the controller manager has
        // synced its informers and runs its controllers.
        wait_until(
            "kube-controller-manager",
            &log,
            Duration::from_secs(90),
            || {
                cluster.kubectl_quiet(&[
                    "get",
                    "serviceaccount",
                    "default",
                    "--namespace",
                    "default",
                ])
            },
        )?;
        Ok(cluster)
    }

    /// Stops the API server (SIGTERM, as a rolling restart does), waits
    /// `down` and starts it again on the same port and storage; returns when
    /// it is ready. Only for a cluster this process started.
    pub fn restart_api_server(&self, down: Duration) -> Result<()> {
        let Some(api_server) = &self.api_server else {
            return Err(Error::Failed {
                name: "kube-apiserver".into(),
                detail: "was not started by this process, so it cannot be restarted".into(),
                log: String::new(),
            });
        };
        api_server.stop();
        std::thread::sleep(down);
        api_server.start()?;
        wait_until(
            "kube-apiserver",
            &api_server.log,
            Duration::from_secs(90),
            || self.kubectl_quiet(&["get", "--raw", "/readyz"]),
        )
    }

    /// Gives [`LIMITED_GROUP`] a priority level of its own: one nominal
    /// concurrency share (the smallest; a few seats of the server's 600),
    /// nothing lent or borrowed, and requests that find no free seat
    /// rejected at once with 429 instead of queued.
    fn throttle_limited_identity(&self, dir: &Path) -> Result<()> {
        let manifest = dir.join("limited-flowcontrol.yaml");
        write(
            &manifest,
            format!(
                "apiVersion: flowcontrol.apiserver.k8s.io/v1\n\
                 kind: PriorityLevelConfiguration\n\
                 metadata: {{name: {LIMITED_USER}}}\n\
                 spec:\n  type: Limited\n  limited:\n    nominalConcurrencyShares: 1\n    \
                 lendablePercent: 0\n    borrowingLimitPercent: 0\n    limitResponse: {{type: Reject}}\n\
                 ---\n\
                 apiVersion: flowcontrol.apiserver.k8s.io/v1\n\
                 kind: FlowSchema\n\
                 metadata: {{name: {LIMITED_USER}}}\n\
                 spec:\n  priorityLevelConfiguration: {{name: {LIMITED_USER}}}\n  matchingPrecedence: 500\n  \
                 distinguisherMethod: {{type: ByUser}}\n  rules:\n  \
                 - subjects: [{{kind: Group, group: {{name: \"{LIMITED_GROUP}\"}}}}]\n    \
                 resourceRules: [{{verbs: [\"*\"], apiGroups: [\"*\"], resources: [\"*\"], namespaces: [\"*\"], clusterScope: true}}]\n    \
                 nonResourceRules: [{{verbs: [\"*\"], nonResourceURLs: [\"*\"]}}]\n"
            ),
        )?;
        let log = dir.join("limited-flowcontrol.log");
        process::run(
            "kubectl apply (FlowSchema of the limited identity)",
            self.kubectl()
                .args(["apply", "--server-side", "-f"])
                .arg(&manifest),
            &log,
        )
    }

    /// Keeps one admission policy binding with ConfigMap parameters bound
    /// for the server's lifetime (matching nothing). kube-apiserver stops
    /// its informer of a built-in parameter kind once no binding uses it,
    /// and a policy bound later reuses the stopped informer: every request
    /// it matches is then denied with "no params found" until a restart
    /// (kubernetes/kubernetes#130887). Without this, the chart's policy
    /// works once per server and fails in the next run that shares it.
    fn keep_config_map_params(&self, dir: &Path) -> Result<()> {
        let manifest = dir.join("keep-params.yaml");
        write(
            &manifest,
            "apiVersion: admissionregistration.k8s.io/v1\n\
             kind: ValidatingAdmissionPolicy\n\
             metadata: {name: kiln-testenv-keep-params}\n\
             spec:\n  failurePolicy: Ignore\n  paramKind: {apiVersion: v1, kind: ConfigMap}\n  \
             matchConstraints:\n    resourceRules:\n    \
             - {apiGroups: [\"\"], apiVersions: [v1], operations: [CREATE], resources: [configmaps]}\n  \
             validations:\n  - expression: \"true\"\n\
             ---\n\
             apiVersion: admissionregistration.k8s.io/v1\n\
             kind: ValidatingAdmissionPolicyBinding\n\
             metadata: {name: kiln-testenv-keep-params}\n\
             spec:\n  policyName: kiln-testenv-keep-params\n  validationActions: [Deny]\n  \
             paramRef: {name: kiln-testenv-keep-params, namespace: default, parameterNotFoundAction: Allow}\n  \
             matchResources:\n    namespaceSelector:\n      \
             matchExpressions: [{key: kiln-testenv/matches-nothing, operator: Exists}]\n",
        )?;
        let log = dir.join("keep-params.log");
        process::run(
            "kubectl apply (the binding that keeps ConfigMap parameters served)",
            self.kubectl()
                .args(["apply", "--server-side", "-f"])
                .arg(&manifest),
            &log,
        )
    }

    /// A kubectl command pointed at this cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    fn kubectl_quiet(&self, args: &[&str]) -> bool {
        self.kubectl()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl ApiServer {
    fn start(&self) -> Result<()> {
        let child = spawn_child(
            "kube-apiserver",
            Tier::Server,
            Command::new(&self.program).args(&self.args),
            &self.root,
            &self.log,
        )?;
        if let Ok(mut slot) = self.child.lock() {
            *slot = Some(child);
        }
        Ok(())
    }

    fn stop(&self) {
        if let Ok(mut slot) = self.child.lock()
            && let Some(mut child) = slot.take()
        {
            process::signal_group(child.id(), "TERM");
            let _ = child.wait();
        }
    }
}

fn start_etcd(root: &Path, dir: &Path, bin: &Path) -> Result<u16> {
    let client = free_port()?;
    let peer = free_port()?;
    let log = dir.join("etcd.log");
    spawn(
        "etcd",
        Tier::Storage,
        Command::new(bin.join("etcd"))
            .arg("--name=kiln-testenv")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!(
                "--initial-cluster=kiln-testenv=http://127.0.0.1:{peer}"
            ))
            // Test data need not survive a power cut.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn"),
        root,
        &log,
    )?;
    wait_until("etcd", &log, Duration::from_secs(30), || {
        http_get(client, "/health").is_some_and(|body| body.contains("\"health\":\"true\""))
    })?;
    Ok(client)
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: kiln-testenv\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: kiln-admin\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: kiln-testenv\n  context:\n    cluster: kiln-testenv\n    user: kiln-admin\n    namespace: default\n\
         current-context: kiln-testenv\n",
        ca = ca.display(),
    )
}

/// The certificates and keys of a cluster: a CA, the API server's serving
/// certificate signed by it, and the service-account signing key pair.
struct Pki {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_private: PathBuf,
    sa_public: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Result<Self> {
        // Our own config, so that the distribution's defaults (which mark
        // every self-signed certificate as a CA) do not leak into the serving
        // certificate: rustls refuses a CA certificate as a server's.
        let config = dir.join("openssl.cnf");
        write(
            &config,
            "[req]\n\
             distinguished_name = dn\n\
             prompt = no\n\
             [dn]\n\
             CN = kiln-testenv\n\
             [ca]\n\
             basicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n\
             [server]\n\
             basicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid\n\
             subjectAltName = IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
        )?;
        let pki = Self {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            sa_private: dir.join("service-account.key"),
            sa_public: dir.join("service-account.pub"),
        };
        let ca_key = dir.join("ca.key");
        let log = dir.join("openssl.log");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(&log, |cmd| {
            cmd.args(["req", "-x509", "-days", "3650", "-extensions", "ca"])
                .args(ec)
                .arg("-config")
                .arg(&config)
                .args(["-subj", "/CN=kiln-testenv-ca"])
                .arg("-keyout")
                .arg(&ca_key)
                .arg("-out")
                .arg(&pki.ca_cert);
        })?;
        openssl(&log, |cmd| {
            cmd.args(["req", "-x509", "-days", "3650", "-extensions", "server"])
                .args(ec)
                .arg("-config")
                .arg(&config)
                .args(["-subj", "/CN=kube-apiserver"])
                .arg("-CA")
                .arg(&pki.ca_cert)
                .arg("-CAkey")
                .arg(&ca_key)
                .arg("-keyout")
                .arg(&pki.serving_key)
                .arg("-out")
                .arg(&pki.serving_cert);
        })?;
        openssl(&log, |cmd| {
            cmd.args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .arg("-out")
            .arg(&pki.sa_private);
        })?;
        openssl(&log, |cmd| {
            cmd.args(["pkey", "-pubout", "-in"])
                .arg(&pki.sa_private)
                .arg("-out")
                .arg(&pki.sa_public);
        })?;
        Ok(pki)
    }
}

fn openssl(log: &Path, args: impl FnOnce(&mut Command)) -> Result<()> {
    let mut cmd = Command::new("openssl");
    args(&mut cmd);
    process::run("openssl", &mut cmd, log).map_err(|e| match e {
        Error::Spawn { .. } => Error::Missing {
            what: "openssl".into(),
            hint: "run tests/install-deps.sh".into(),
        },
        other => other,
    })
}
