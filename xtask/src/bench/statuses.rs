//! Deployment-status messages as TRE's resource processor publishes them to the
//! service (the publisher contract in `docs/rabbitmq.md`): default exchange, routing key
//! = queue, persistent, JSON, a message id, `correlation_id` = resource id, the ordering
//! key (operation id) in `x-session-id`, `mandatory`, with confirms.

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};

/// A single-step operation the service created, as its `POST /api/resources` answer
/// names it.
#[derive(Debug, Clone)]
pub(crate) struct Operation {
    pub(crate) id: String,
    pub(crate) step_id: String,
    pub(crate) resource_id: String,
}

impl Operation {
    /// From the `operation` of a `202 Accepted` answer.
    pub(crate) fn from_answer(answer: &Value) -> Result<Self> {
        let operation = &answer["operation"];
        let text = |value: &Value, what: &str| {
            value.as_str().map(str::to_owned).with_context(|| format!("no {what} in {answer}"))
        };
        let step = &operation["steps"][0];
        Ok(Self {
            id: text(&operation["id"], "operation id")?,
            step_id: text(&step["id"], "step id")?,
            resource_id: text(&operation["resourceId"], "resource id")?,
        })
    }

    /// The status report `status` of this operation's step (outputs only on success).
    pub(crate) fn status(&self, status: &str) -> Vec<u8> {
        let outputs = if status == "deployed" {
            json!([{"name": "workspace_url", "value": format!("https://{}.tre.example", self.resource_id), "type": "string"}])
        } else {
            json!([])
        };
        json!({
            "operationId": self.id,
            "stepId": self.step_id,
            "id": self.resource_id,
            "status": status,
            "message": format!("{}: {status}", self.resource_id),
            "outputs": outputs,
        })
        .to_string()
        .into_bytes()
    }
}

/// Publishes `messages` (body, operation) to `queue` in order on one channel, up to
/// [`super::rabbitmq::PUBLISH_WINDOW`] unconfirmed; fails unless every one is routed
/// and confirmed.
pub(crate) async fn publish(queue: &str, messages: &[(Vec<u8>, &Operation)]) -> Result<()> {
    let connection = Connection::connect(
        &super::rabbitmq::url(),
        ConnectionProperties::default().with_connection_name("steward-bench-processor".into()),
    )
    .await
    .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = FuturesUnordered::new();
    for (n, (body, operation)) in messages.iter().enumerate() {
        if pending.len() >= super::rabbitmq::PUBLISH_WINDOW {
            confirmed(pending.next().await)?;
        }
        let mut headers = FieldTable::default();
        headers.insert("x-session-id".into(), AMQPValue::LongString(operation.id.as_str().into()));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(format!("{}-{n}", operation.id).into())
            .with_correlation_id(operation.resource_id.as_str().into())
            .with_headers(headers);
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let confirm =
            channel.basic_publish("".into(), queue.into(), options, body, properties).await?;
        pending.push(confirm);
    }
    while let Some(result) = pending.next().await {
        confirmed(Some(result))?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

fn confirmed(result: Option<lapin::Result<Confirmation>>) -> Result<()> {
    match result {
        Some(Ok(Confirmation::Ack(None))) => Ok(()),
        Some(Ok(other)) => bail!("a status was not routed and confirmed: {other:?}"),
        Some(Err(error)) => Err(error.into()),
        None => bail!("no confirm pending"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::Operation;

    #[test]
    fn statuses_answer_the_step_of_the_created_operation() {
        let answer = json!({"operation": {"id": "op-1", "resourceId": "res-1",
            "steps": [{"id": "step-1", "templateStepId": "main", "resourceId": "res-1"}]}});
        let operation = Operation::from_answer(&answer).expect("an operation");
        let deploying: Value =
            serde_json::from_slice(&operation.status("deploying")).expect("JSON");
        assert_eq!(
            deploying,
            json!({"operationId": "op-1", "stepId": "step-1", "id": "res-1",
                "status": "deploying", "message": "res-1: deploying", "outputs": []})
        );
        let deployed: Value = serde_json::from_slice(&operation.status("deployed")).expect("JSON");
        assert_eq!(deployed["outputs"][0]["name"], "workspace_url");
        assert_eq!(deployed["outputs"][0]["type"], "string");
    }

    #[test]
    fn an_answer_without_a_step_is_an_error() {
        let answer = json!({"operation": {"id": "op-1", "resourceId": "res-1", "steps": []}});
        assert!(Operation::from_answer(&answer).is_err());
    }
}
