//! TokenReview and SubjectAccessReview, as kube-apiserver answers them: users by bearer token
//! (its `--token-auth-file`) and RBAC-like rules, each letting a user or group do verbs on
//! resources in a namespace (or every namespace).

use serde_json::{Value, json};

/// Users and what they may do.
#[derive(Default)]
pub(super) struct Reviews {
    users: Vec<(String, String, Vec<String>)>,
    rules: Vec<Rule>,
}

/// One permission, as a RoleBinding (`namespace` set) or ClusterRoleBinding (`"*"`) to a
/// role with one rule would grant it.
struct Rule {
    subject: String,
    verbs: Vec<String>,
    /// `group/resource` or `group/resource/subresource` (core: empty group, `/secrets`).
    resources: Vec<String>,
    namespace: String,
}

impl Reviews {
    pub(super) fn add_user(&mut self, token: &str, name: &str, groups: &[&str]) {
        self.users.push((
            token.to_string(),
            name.to_string(),
            groups.iter().map(|g| (*g).to_string()).collect(),
        ));
    }

    pub(super) fn allow(
        &mut self,
        subject: &str,
        verbs: &[&str],
        resources: &[&str],
        namespace: &str,
    ) {
        self.rules.push(Rule {
            subject: subject.to_string(),
            verbs: verbs.iter().map(|v| (*v).to_string()).collect(),
            resources: resources.iter().map(|r| (*r).to_string()).collect(),
            namespace: namespace.to_string(),
        });
    }

    /// The answered TokenReview.
    pub(super) fn token_review(&self, mut review: Value) -> Value {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        review["status"] = match self.users.iter().find(|(t, _, _)| t == token) {
            Some((_, name, groups)) => {
                let mut groups = groups.clone();
                groups.push("system:authenticated".to_string());
                json!({
                    "authenticated": true,
                    "user": {"username": name, "uid": format!("uid-{name}"), "groups": groups},
                })
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        review
    }

    /// The answered SubjectAccessReview.
    pub(super) fn subject_access_review(&self, mut review: Value) -> Value {
        let spec = &review["spec"];
        let user = spec["user"].as_str().unwrap_or_default();
        let groups: Vec<&str> = spec["groups"]
            .as_array()
            .map(|g| g.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let attributes = &spec["resourceAttributes"];
        let text = |field: &str| attributes[field].as_str().unwrap_or_default();
        let mut resource = format!("{}/{}", text("group"), text("resource"));
        if !text("subresource").is_empty() {
            resource = format!("{resource}/{}", text("subresource"));
        }
        let (verb, namespace) = (text("verb"), text("namespace"));
        let allowed = self.rules.iter().any(|rule| {
            (rule.subject == user || groups.contains(&rule.subject.as_str()))
                && rule.verbs.iter().any(|v| v == "*" || v == verb)
                && rule.resources.contains(&resource)
                && (rule.namespace == "*" || (!namespace.is_empty() && rule.namespace == namespace))
        });
        review["status"] = if allowed {
            json!({"allowed": true, "reason": "allowed by a test rule"})
        } else {
            json!({"allowed": false})
        };
        review
    }
}
