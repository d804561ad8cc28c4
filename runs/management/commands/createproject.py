from django.core.management.base import BaseCommand, CommandError

from runs.models import Project


class Command(BaseCommand):
    help = (
        "Create a project; print its Sentry DSN on a line of its own, then its new ingest "
        "token alone on the last line."
    )

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--slug", default="")

    def handle(self, name: str, slug: str, **options):
        project = Project(name=name, slug=slug)
        project.save()
        if not project.slug:
            raise CommandError("could not derive a slug; pass --slug")
        token = project.create_token(label="createproject")
        self.stderr.write(
            f"Created project {project.name!r} (slug {project.slug}, id {project.id}).\n"
            "The ingest token below is shown once; store it now."
        )
        self.stdout.write(project.dsn)  # the Sentry DSN: SENTRY_DSN=<this line>
        self.stdout.write(token)
