//! MQTT topics of one node (DESIGN §6) and the parsing of request topics. The request payload
//! is a V2 JSON body, parsed by [`crate::protocol::json::parse_request`].

/// Topics of one node.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
    pub site: String,
    pub node: String,
}

impl Topics {
    pub fn requests(&self, shared_group: &str) -> String {
        let t = format!("{}/{}/infer/#", self.prefix, self.site);
        if shared_group.is_empty() {
            t
        } else {
            format!("$share/{shared_group}/{t}")
        }
    }

    pub fn status(&self) -> String {
        format!("{}/{}/{}/status", self.prefix, self.site, self.node)
    }

    /// Where events of a type are published (CloudEvents JSON; the node is the event's
    /// `source`).
    pub fn event(&self, ty: &str) -> String {
        format!("{}/{}/events/{ty}", self.prefix, self.site)
    }

    pub fn result(&self, model: &str) -> String {
        format!("{}/{}/result/{model}", self.prefix, self.site)
    }

    /// `(model, version)` of a request topic, or why it is not one.
    pub fn parse_request_topic(&self, topic: &str) -> Result<(String, Option<String>), String> {
        let base = format!("{}/{}/infer/", self.prefix, self.site);
        let rest = topic.strip_prefix(&base).ok_or_else(|| format!("'{topic}' is not a request topic"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let ok = |s: &str| crate::valid_name(s);
        match parts.as_slice() {
            [m] if ok(m) => Ok(((*m).to_owned(), None)),
            [m, "versions", v] if ok(m) && ok(v) => Ok(((*m).to_owned(), Some((*v).to_owned()))),
            _ => Err(format!("'{topic}': expected {base}<model>[/versions/<version>]")),
        }
    }
}
