//! Objects in the control plane's API: server-side apply, status, delete and get of any
//! kind (its resource found by discovery, cached), and `kubectl`.

use std::process::{Command, Output};

use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{self, Scope},
};
use serde_json::Value;

use super::{ControlPlane, FIELD_MANAGER};
use crate::{
    cleanup::lock,
    error::{Result, TestbedError},
};

impl ControlPlane {
    /// Server-side applies any object (typed or YAML) as the testbed's field manager.
    pub fn apply(&self, object: &impl serde::Serialize) -> Result<DynamicObject> {
        let value = serde_json::to_value(object)
            .map_err(|error| TestbedError::Other(format!("serialising an object: {error}")))?;
        let (api, name) = self.api_for(&value)?;
        let what = format!("applying {}", describe(&value));
        self.run(async move {
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(value),
            )
            .await
            .map_err(|source| TestbedError::Kube { what, source })
        })
    }

    /// Server-side applies `status` to the object's status subresource, as `manager`.
    pub fn apply_status(&self, object: &Value, manager: &str) -> Result<()> {
        let (api, name) = self.api_for(object)?;
        let what = format!("applying the status of {}", describe(object));
        let object = object.clone();
        let params = PatchParams::apply(manager).force();
        self.run(async move {
            api.patch_status(&name, &params, &Patch::Apply(object))
                .await
                .map(|_| ())
                .map_err(|source| TestbedError::Kube { what, source })
        })
    }

    /// Deletes the object `value` names (apiVersion, kind, metadata); a missing one is fine.
    pub fn delete(&self, value: &Value, grace_period_seconds: Option<u32>) -> Result<()> {
        let (api, name) = self.api_for(value)?;
        let what = format!("deleting {}", describe(value));
        self.run(async move {
            let params = kube::api::DeleteParams {
                grace_period_seconds,
                ..Default::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(source) => Err(TestbedError::Kube { what, source }),
            }
        })
    }

    /// Reads the object `value` names, if it exists.
    pub fn get(&self, value: &Value) -> Result<Option<DynamicObject>> {
        let (api, name) = self.api_for(value)?;
        let what = format!("reading {}", describe(value));
        self.run(async move {
            api.get_opt(&name)
                .await
                .map_err(|source| TestbedError::Kube { what, source })
        })
    }

    /// The API (resource and scope found by discovery, cached) for an object's kind.
    fn api_for(&self, value: &Value) -> Result<(Api<DynamicObject>, String)> {
        let field = |path: &str| value.pointer(path).and_then(Value::as_str);
        let (Some(api_version), Some(kind), Some(name)) = (
            field("/apiVersion"),
            field("/kind"),
            field("/metadata/name"),
        ) else {
            return Err(TestbedError::Other(format!(
                "an object needs apiVersion, kind and metadata.name: {value}"
            )));
        };
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, scope) = self.resource(&gvk)?;
        let api = match (scope, field("/metadata/namespace")) {
            (Scope::Cluster, _) => Api::all_with(self.client.clone(), &resource),
            (Scope::Namespaced, Some(namespace)) => {
                Api::namespaced_with(self.client.clone(), namespace, &resource)
            }
            (Scope::Namespaced, None) => {
                return Err(TestbedError::Other(format!(
                    "{kind} {name} is namespaced but names no namespace"
                )));
            }
        };
        Ok((api, name.to_owned()))
    }

    fn resource(&self, gvk: &GroupVersionKind) -> Result<(ApiResource, Scope)> {
        if let Some(found) = lock(&self.resources).get(gvk) {
            return Ok(found.clone());
        }
        let client = self.client.clone();
        let wanted = gvk.clone();
        let found = self.run(async move {
            discovery::pinned_kind(&client, &wanted)
                .await
                .map(|(resource, capabilities)| (resource, capabilities.scope))
                .map_err(|source| TestbedError::Kube {
                    what: format!(
                        "discovering {}/{} {}",
                        wanted.group, wanted.version, wanted.kind
                    ),
                    source,
                })
        })?;
        lock(&self.resources).insert(gvk.clone(), found.clone());
        Ok(found)
    }

    /// Runs `kubectl` with the admin kubeconfig in the bridge namespace.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        let mut command = Command::new(self.testenv.bin("kubectl")?);
        command
            .args(args)
            .env("KUBECONFIG", self.admin_kubeconfig());
        self.output_in_netns(command)
    }

    /// Sets the label `key` on each `(node, value)` Node.
    pub fn label_nodes(&self, key: &str, nodes: &[(&str, &str)]) -> Result<()> {
        for (node, value) in nodes {
            self.kubectl_ok(&["label", "node", node, &format!("{key}={value}")])?;
        }
        Ok(())
    }

    /// Runs `kubectl` and returns its stdout; fails with its stderr if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.kubectl(args)?;
        if !output.status.success() {
            return Err(TestbedError::Command {
                command: format!("kubectl {}", args.join(" ")),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// `kind namespace/name` of an object, for messages.
fn describe(value: &Value) -> String {
    let field = |path: &str| value.pointer(path).and_then(Value::as_str).unwrap_or("?");
    match value.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(namespace) => format!("{} {namespace}/{}", field("/kind"), field("/metadata/name")),
        None => format!("{} {}", field("/kind"), field("/metadata/name")),
    }
}
